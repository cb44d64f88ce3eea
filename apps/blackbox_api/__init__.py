"""Black-box API tuning: federated prompt tuning of a model that clients reach only over HTTP.

The model owner serves a frozen backbone; each party holds its own data and a bearer token, and
sees nothing of the model but logits and losses. Parties search an intrinsic prompt z (prompt =
A z + p0, A rebuilt by everyone from the run's seed) by CMA-ES; a FedBPT server combines their
results. Per party per round, d + 1 floats go down and d + 4 come back.

1. The model owner starts the service (tokens: one per party, at least 16 characters)::

       export FEDPROMPT_API_TOKENS="party-1:$(openssl rand -hex 16),party-2:$(openssl rand -hex 16)"
       fedprompt serve --model bundled:all-MiniLM-L6-v2 --max-length 48 --host 0.0.0.0 --port 8000

   Endpoints: ``GET /v1/health``; with ``Authorization: Bearer <token>``: ``GET /v1/info``,
   ``GET /v1/usage`` (the caller's query counter), ``POST /v1/logits`` and ``POST /v1/losses``
   (candidates z with their projection spec, the head spec, inputs as token ids). Requests over
   the size and count limits, with a wrong dimension, a NaN, an unknown token id or field, get a
   4xx that names the problem. Nothing returns a weight or a gradient.

2. A party runs the federation against it (its token in the variable ``backbone.token_env`` names)::

       export FEDPROMPT_API_TOKEN=<party-1's token>
       fedprompt run configs/fedbpt-sst2-remote.yaml --set backbone.url=http://model-host:8000

3. Or all of it in one process, offline, on the bundled model and corpus (``python -m
   apps.blackbox_api``): ``demo.run_demo`` starts the service on a free loopback port with fresh
   tokens, runs a small FedBPT federation whose clients query it, and prints accuracy, the
   queries the service counted, and the bytes each client sent and received per round.
"""
