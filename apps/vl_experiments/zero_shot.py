"""Zero-shot CLIP, the floor of the comparison: the frozen backbone scoring a fixed class template.

Nothing trains and nothing travels. The run's data, partition and clients are those of every other
method (the same configuration and seed); the model is CLIP's image features against the text
features of the template filled with each class name, evaluated as a trained prompt would be: on
the test set (base classes), on the novel classes and on each client's held-out split. Its folder
is a run folder like the others, with round 0 only.
"""

from __future__ import annotations

import yaml

from fedprompt.config import RunConfig
from fedprompt.execution.metrics import (
    RunRecorder,
    client_evaluation_row,
    evaluate_global,
    summarize,
    summarize_client_evaluations,
)
from fedprompt.execution.results import CONFIG_FILE, RunDirectory, RunResult
from fedprompt.federation.personalization import PromptSplit
from fedprompt.files import write_text_atomically
from fedprompt.tasks.experiment import Experiment
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.gradient import evaluate
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.clip_text_context import FixedClassText
from prompt_modules.visual_prompts import FrozenImage


def zero_shot_model(experiment: Experiment, template: str) -> CLIPPromptClassifier:
    """The experiment's backbone scoring ``template`` filled with each class name (no prompt state)."""
    model = experiment.model
    assert isinstance(model, CLIPPromptClassifier)  # built from an open-clip configuration
    classifier = CLIPPromptClassifier(
        model.backbone, FixedClassText(template), FrozenImage(), model.class_names
    )
    return classifier.to(experiment.device).eval()


def run_zero_shot(config: RunConfig, template: str, run_dir: RunDirectory | None = None) -> RunResult:
    """Evaluate zero-shot CLIP on the data and clients of ``config`` (whose prompt must read cached
    image features, e.g. ``coop``); write round 0 to ``run_dir`` as any run would."""
    experiment = build_experiment(config)
    model = zero_shot_model(experiment, template)
    if model.image_input != experiment.model.image_input:
        raise ValueError(
            f"zero-shot CLIP reads image features; its configuration's prompt {config.prompt.kind!r} "
            "prepares other image inputs"
        )
    experiment.model, experiment.split = model, PromptSplit({})
    row = evaluate_global(experiment, {}, config)
    clients = []
    if config.federation.local_evaluation:
        batch = config.runtime.eval_batch_size
        for cid, client in sorted(experiment.clients.items()):
            if client.val_data is not None and len(client.val_data):
                metrics = evaluate(model, client.val_data, batch, experiment.device)
                clients.append(client_evaluation_row(0, cid, metrics))
        row.update(summarize_client_evaluations(clients))
    recorder = RunRecorder(config, run_dir)
    if run_dir is not None:
        note = (
            f"# zero-shot CLIP: the class template {template!r} scored by the frozen backbone, no "
            "training.\n# The data, partition and clients are this configuration's; its prompt "
            "section only selects cached image features.\n"
        )
        text = note + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        write_text_atomically(run_dir.path / CONFIG_FILE, text)
    recorder.record_initial(row, clients)
    result = RunResult(
        config=config,
        history=recorder.history,
        client_history=recorder.client_history,
        final_state={},
        run_dir=run_dir.path if run_dir else None,
        backbone_bytes=experiment.backbone_bytes,
    )
    result.summary = {
        **summarize(result),
        "label_names": list(experiment.label_names),
        "zero_shot_template": template,
    }
    if run_dir is not None:
        run_dir.write_summary(result.summary)
    return result
