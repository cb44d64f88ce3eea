"""The vision-language comparison a paper needs: every CLIP prompt method of fedprompt and zero-shot
CLIP on one backbone, one dataset, one partition and the same seeds, evaluated base-to-novel, or
across domains on multi-domain images (per domain, mean, worst and held-out domain;
``configs/vl-domains.yaml``).

    python -m apps.vl_experiments [--config configs/vl-experiments.yaml] [--seeds 0 1 2] [--out DIR]
        [--methods promptfl vpt ...] [--set key=value ...]

Methods (``apps.vl_experiments.methods``): ``zero-shot`` (the frozen backbone scoring the class
template, no training: the floor), ``promptfl`` (CoOp context, FedAvg), ``vpt`` (deep visual prompt
tokens), ``tpfl`` (text context + pixel patch), ``atpfl`` (TPFL's contrastive variant) and
``fedtpg`` (the prompt generator, each client over its own classes), ``fedapt`` (keyed context and
an adaptive network), ``fed-dpt`` (a text prompt per domain, weighted by the visual prompt's
attention), ``split`` (8 shared and 8 local context vectors) and ``finetuned`` (PromptFL, then 20
local steps). Each runs with the settings of its config in ``configs/`` unless the experiment's
``methods.<name>`` entry overrides some of them.

The experiment file (``ExperimentConfig``; pydantic, unknown fields refused) holds the shared parts
as fedprompt's sections (``backbone``, ``data`` with ``novel_class_fraction``, ``partition``,
``federation``, ``payload``, ``robustness``, ``runtime``), the ``seeds``, the ``class_template``
and ``methods``. Every method's run configuration is built and validated, and its layer-dependent
prompt fields checked against the backbone's model configuration, before any model loads. Without
``--config`` the embedded default runs: the built-in digits on ``bundled:demo-clip`` (fedprompt's
offline demo backbone; ``fedprompt demo-backbone`` builds it), identical to
``configs/vl-experiments.yaml``. Any open_clip model (``backbone.model: ViT-B-16``,
``pretrained: openai``) and any Hugging Face image dataset (``data.source: hub``) or local image
folder (``source: image-folder``) work the same way.

The output folder holds ``experiment.yaml`` (the resolved experiment), ``runs/<method>-seed<s>/``
(each run's own results folder: config, metrics.jsonl, clients.jsonl, summary.json),
``comparison.md`` and ``comparison.csv`` (per method: base, novel and harmonic-mean accuracy, the
clients' mean local accuracy, bytes up and down per client per round, wall time; mean ± sample std
over the seeds), ``runs.csv`` (every run's values) and ``plots/<metric>.png`` (one curve per method,
the mean over the seeds, per round and against the cumulative bytes; zero-shot as a horizontal
line). The same seeds give the same table bit for bit on the same machine, wall times aside.
"""

from apps.vl_experiments.config import ExperimentConfig, load_experiment
from apps.vl_experiments.runner import Comparison, run_comparison, select

__all__ = ["Comparison", "ExperimentConfig", "load_experiment", "run_comparison", "select"]
