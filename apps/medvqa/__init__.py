"""``python -m apps.medvqa --config configs/medvqa-easyvqa.yaml``: prompt-based personalised federated
visual question answering (after Zhu et al.; METHODS.md, "Personalisation" and "Medical VQA with CLIP
prompts"), beside its two baselines, on one data set, partition and seed.

Clients are the values of ``data.vqa.client_field`` (organs or sites of VQA-RAD / SLAKE; shapes or
question types of easy-vqa). A frozen open_clip CLIP answers by similarity between a joint
image-question query and each candidate answer's text (``prompt.kind: vqa-twin``: learned question
and answer contexts, VPT tokens on the image, a small fusion). The command runs

- ``personalised``: every client keeps its own twin prompt; the server sends each client a shared
  prompt weighted by the others' validation accuracy and agreement (``strategy.kind: reliability``,
  the config's α pulls the personal prompt toward it);
- ``fedavg``: one global prompt, FedAvg of all prompt parts;
- ``local``: every client trains its own prompt alone (reliability with α = 0: the same rounds and
  steps, nothing learnt from the others);

and scores each client's final prompt (``fedavg``: the global one) on that client's test questions:
accuracy overall, on closed (yes/no) and open questions, and per question type, per client, over
all clients and as the mean over clients, beside the majority-answer baselines (the pooled training
answers', and each client's own). The table is written as ``results.md`` and ``results.csv``.
"""
