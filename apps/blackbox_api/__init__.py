"""Black-box API tuning: federated prompt tuning of a model that its parties reach only over HTTP.

Three kinds of party, each running its own process on its own machine:

- the **model owner** serves the frozen model (``fedprompt serve``): bearer tokens, one per
  party; HTTPS; a query quota and a request rate per token; logits and losses, never weights or
  gradients;
- the **federation server** (``python -m apps.blackbox_api server``) runs the FedBPT server on
  Flower: one global CMA-ES that combines what the clients found each round;
- each **data owner** (``python -m apps.blackbox_api client --partition-id N``) keeps its data,
  searches an intrinsic prompt z (prompt = A z + p0, A rebuilt by every party from the run's
  seed) by CMA-ES, scoring each generation's population in one request to the model owner's
  service, and sends the server only z and four numbers (d + 4 floats; d + 1 come back).

All read one fedprompt configuration (``configs/blackbox-api.yaml``: ``backbone.kind: remote``,
the task as a Hugging Face dataset name or local files, the classes' label words or descriptions
under ``head``, BBT's reference prompt of 50 tokens and d = 500). Paths in it (data files,
``backbone.ca_file``) resolve in each party's working folder; every site loads the task the
configuration names and keeps the partition ``--partition-id`` gives it, as fedprompt's Flower
sites do. Each party's token is in the variable ``backbone.token_env`` names.

1. The model owner (tokens named ``server`` and ``site-<N>``, so the cost report can join the
   service's counts to the run's clients)::

       export FEDPROMPT_API_TOKENS="server:$(openssl rand -hex 16),site-0:$(openssl rand -hex 16),..."
       fedprompt serve --model bundled:all-MiniLM-L6-v2 --max-length 48 --host 0.0.0.0 --port 8443 \\
           --ssl-certfile service.pem --ssl-keyfile service.key \\
           --query-quota 200000 --rate-limit 20 --usage-file usage.json

2. The federation server (its own token, for the global evaluation on its test split)::

       export FEDPROMPT_API_TOKEN=<the server's token>
       python -m apps.blackbox_api server --config configs/blackbox-api.yaml \\
           --ssl-ca-certfile ca.crt --ssl-certfile link.pem --ssl-keyfile link.key --usage usage.json

   It starts a Flower SuperLink, writes the Flower app for the configuration, submits the run,
   waits for every client (``--node-wait-timeout``), and at the end stops the SuperLink and prints
   (and writes to the run folder as ``cost_report.json``) the query budget and each client's cost:
   rounds, queries as the client reported them and as the service counted them for its token,
   bytes per round on the federation link and to the service. ``--usage`` is the service's usage
   file where the model owner shares it; ``python -m apps.blackbox_api report RUN --usage FILE``
   prints the same later.

3. Each data owner::

       export FEDPROMPT_API_TOKEN=<site-N's token>
       python -m apps.blackbox_api client --config configs/blackbox-api.yaml --partition-id N \\
           --superlink server.example:9093 --root-certificates ca.crt

   It starts a fedprompt site worker (the tokenised data and the HTTPS connection to the service,
   kept for the whole run) and a Flower SuperNode hosting partition N that hands it each message,
   and runs until interrupted.

``--insecure`` (both roles) runs the Flower link without TLS, for trials; the service then warns
when it listens beyond loopback without TLS too.

Why this design: the model owner's service is the only place the weights live, so it is a
process of its own that enforces who may query and how much (tokens, quotas, rates, lockout), and
counts every query per token, exactly (a retried request carries an ``Idempotency-Key`` and is
counted once). The federation between server and data owners is fedprompt's Flower runtime
unchanged (the project's distribution technology, with its TLS, SuperNode authentication and
site workers); the two roles here only start Flower's processes with the configuration each role
needs, so a deployment is three commands instead of a page of Flower flags, and the same
configuration and seed give the same global prompt as ``fedprompt run`` in one process (tested
bit for bit, with the parties as separate processes on loopback).

4. Or all of it in one process, offline, on the bundled model and corpus (``python -m
   apps.blackbox_api``): ``demo.run_demo`` starts the service on a free loopback port with fresh
   tokens, runs a small FedBPT federation whose clients query it, and prints accuracy, the
   queries the service counted, and the bytes each client sent and received per round.
"""
