"""Text classification with a soft prompt on a frozen HF model: config -> backbone, module, clients."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from fedprompt.config import (
    LLM_BACKBONE_KINDS,
    CMAESOptimizerConfig,
    ConfigError,
    DeepPromptConfig,
    HFTextBackboneConfig,
    PolicyGradientOptimizerConfig,
    PseudoLabelConfig,
    RemoteBackboneConfig,
    RunConfig,
    SoftPromptConfig,
    SPSAOptimizerConfig,
    ZooPFLPromptConfig,
)
from fedprompt.data.loading import load_text_classification
from fedprompt.data.partition import held_out_split, partition_indices
from fedprompt.federation.strategies.fedkseed import kseed_setup
from fedprompt.federation.strategies.registry import build_strategy
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.tasks.clients import HostedRows, build_clients
from fedprompt.tasks.experiment import Experiment
from fedprompt.tasks.preflight import check_co_planning_depths
from fedprompt.tasks.text.language_model import build_language_model
from fedprompt.tasks.text.parts import build_head, build_prompt, load_backbone
from fedprompt.tasks.text.remote import build_remote_model
from fedprompt.training.batching import TensorData
from fedprompt.training.blackbox import build_blackbox_trainer, search_sigma
from fedprompt.training.client import Client
from fedprompt.training.device import make_accelerator
from fedprompt.training.discrete import PolicyGradientTrainer
from fedprompt.training.gradient import GradientTrainer, LocalTrainer, gradient_optimizer, round_schedule
from fedprompt.training.metering import MeteredTrainer
from fedprompt.training.pseudo_labels import PseudoLabelTrainer, diverse_subset
from fedprompt.training.zoo_pfl import ZooPFLTrainer
from optimizers.zeroth_order import SPSASettings
from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier
from prompt_modules.intrinsic_generator import GeneratedIntrinsicPrompt
from prompt_modules.layer_scores import consensus_scores, top_layers
from prompt_modules.text_classifier import (
    LAYER_INPUT,
    TextPromptClassifier,
)
from prompt_modules.zoo_pfl import ZooPFLClassifier


def build_text_experiment(config: RunConfig, client_ids: Collection[int] | None = None) -> Experiment:
    """Load data and backbone, build the prompt module, tokenise once, partition, make the clients."""
    accelerator = make_accelerator(config.runtime)
    data = load_text_classification(config.data, seed=derive_seed(config.seed, "data"))
    notes: dict = {}
    if config.backbone.kind in LLM_BACKBONE_KINDS:
        parts = build_language_model(config, data.label_names, list(data.train["text"]))
        model, backbone_bytes, notes = parts.model, parts.backbone_bytes, parts.notes
    elif isinstance(config.backbone, RemoteBackboneConfig):
        model, backbone_bytes = build_remote_model(config, config.backbone, data.label_names)
    else:
        model, backbone_bytes = _local_model(config, config.backbone, data.label_names, accelerator.device)
    model.to(accelerator.device).eval()

    def tensors(dataset) -> TensorData:
        encoded = model.encode_texts(dataset["text"])
        return TensorData({**encoded, "labels": torch.tensor(dataset["label"], dtype=torch.long)})

    with _checked_against_the_model("head.template"):
        train, test = tensors(data.train), tensors(data.test)
    acceptance_data = None
    if config.federation.acceptance is not None:
        held_out, rest = held_out_split(
            train.labels.numpy(),
            config.federation.acceptance.held_out_per_class,
            seed=derive_seed(config.seed, "acceptance-held-out"),
        )
        acceptance_data, train = train.subset(held_out), train.subset(rest)
    parts = partition_indices(
        train.labels.numpy(), config.partition, seed=derive_seed(config.seed, "partition")
    )
    trainer = _trainer(config, accelerator)
    rows = HostedRows.of_all_rows(parts, client_ids, len(train))
    if isinstance(config.prompt, DeepPromptConfig) and config.prompt.select_layers is not None:
        if client_ids is not None:
            raise ConfigError(
                "prompt.select_layers scores the layers on every client's data before round 1, which "
                "runs in-process only; on Flower give the layers it chose as prompt.layers (an in-process "
                "run writes them in its summary, prompt_layers)"
            )
        every = build_clients(config, model, train, rows, lambda cid: trainer)
        chosen, scores = select_prompt_layers(config.prompt, model, every, config.seed, accelerator.device)
        model.prompt = build_prompt(
            config.prompt, model.backbone, config.seed, search_sigma(config.optimizer), layer_ids=chosen
        ).to(accelerator.device)
        notes.update({"prompt_layers": chosen, "layer_scores": scores})
    plan = config.pseudo_labels.co_planning if config.pseudo_labels is not None else None
    if plan is not None and isinstance(config.prompt, DeepPromptConfig):
        check_co_planning_depths(plan.depths, config.prompt, model.backbone.num_layers)
    cache_layer = _cached_layer(config, model)
    if cache_layer:
        for dataset in (train, test, *([acceptance_data] if acceptance_data is not None else [])):
            dataset.tensors[LAYER_INPUT] = _layer_inputs(
                model, dataset.tensors, config.runtime.eval_batch_size, accelerator.device
            )
    clients = build_clients(config, model, train, rows, lambda cid: trainer)
    if config.pseudo_labels is not None and config.pseudo_labels.diverse_fraction < 1:
        _keep_diverse_candidates(config.pseudo_labels, model, clients, config.runtime.eval_batch_size)
    return Experiment(
        model=model,
        clients=clients,
        test_data=test,
        strategy=build_strategy(
            config.strategy,
            search_sigma(config.optimizer),
            kseed_setup(config),
            run=config,
            prompt_tensors=model.prompt_tensor_names(),
        ),
        device=accelerator.device,
        backbone_bytes=backbone_bytes,
        label_names=list(data.label_names),
        notes=notes,
        acceptance_data=acceptance_data,
    )


def _keep_diverse_candidates(
    pseudo: PseudoLabelConfig, model: TextPromptClassifier, clients: dict[int, Client], batch_size: int
) -> None:
    """Keep each client's ``diverse_fraction`` of its unlabelled examples chosen by vote-k on the frozen
    model's sentence features: its pseudo-label candidates for the whole run (chosen once, on the client)."""
    for client in clients.values():
        pool = client.unlabelled_data
        if pool is None or len(pool) == 0:
            continue
        device = client.device
        features = torch.cat([model.input_features(b).cpu() for b in pool.batches(batch_size, device=device)])
        count = max(1, int(pseudo.diverse_fraction * len(pool)))
        client.unlabelled_data = pool.subset(diverse_subset(features, count, pseudo.vote_neighbours))


def select_prompt_layers(
    config: DeepPromptConfig,
    model: TextPromptClassifier,
    clients: dict[int, Client],
    seed: int,
    device: torch.device,
) -> tuple[list[int], dict[str, float]]:
    """FedPepTAO's layer selection: each client scores the candidate layers (``start_layer`` up) on
    ``score_batch_size`` of its training examples (a seeded draw), the server weights the scores by
    the clients' example counts and keeps the ``select_layers`` layers of highest score. Returns the
    chosen layers (ascending) and every candidate's consensus score."""
    candidates = list(range(config.start_layer, model.backbone.num_layers))
    scores, weights = [], []
    for cid, client in sorted(clients.items()):
        data = client.train_data
        generator = torch_generator(derive_seed(seed, "layer-scores", cid))
        rows = torch.randperm(len(data), generator=generator)[: config.score_batch_size]
        if len(rows) < 2:
            raise ConfigError(
                f"prompt.select_layers: client {cid} has fewer than 2 training examples to score"
            )
        batch = next(data.subset(rows.numpy()).batches(len(rows), device=device))
        scores.append(model.layer_scores(batch, candidates))
        weights.append(len(data))
    consensus = consensus_scores(scores, weights)
    chosen = top_layers(consensus, candidates, config.select_layers)
    return chosen, {str(layer): float(value) for layer, value in zip(candidates, consensus, strict=True)}


def _cached_layer(config: RunConfig, model: object) -> int:
    """The deep prompt's first layer when the states entering it are to be cached, else 0."""
    prompt = config.prompt
    if not (isinstance(prompt, DeepPromptConfig) and prompt.cache_frozen_layers):
        return 0
    return model.cached_layer if isinstance(model, TextPromptClassifier) else 0


def _layer_inputs(
    model: TextPromptClassifier, encoded: dict[str, torch.Tensor], batch_size: int, device: torch.device
) -> torch.Tensor:
    """The unprompted states entering the deep prompt's first layer for every example [N, L, h],
    computed once in batches of ``batch_size`` (in the data's right-padded layout, on the CPU)."""
    chunks = []
    for start in range(0, len(encoded["input_ids"]), batch_size):
        batch = {name: t[start : start + batch_size].to(device) for name, t in encoded.items()}
        chunks.append(model.layer_inputs(batch).cpu())
    return torch.cat(chunks)


def _local_model(
    config: RunConfig, backbone_config: HFTextBackboneConfig, label_names: Sequence[str], device: torch.device
) -> tuple[TextPromptClassifier | ZooPFLClassifier, int]:
    """The prompt module on a backbone loaded in this process, and the backbone's size in bytes."""
    backbone = load_backbone(backbone_config, config.head.kind, config.seed).to(device)
    if isinstance(config.prompt, ZooPFLPromptConfig):
        with _checked_against_the_model("head.template"):
            model = ZooPFLClassifier(
                backbone,
                len(label_names),
                config.prompt.rank,
                config.head.template,
                seed=derive_seed(config.seed, "prompt-init"),
            )
        return model, backbone.num_bytes()
    with _checked_against_the_model("head"):
        head = build_head(config.head, backbone, label_names)
    with _checked_against_the_model("prompt"):
        prompt = build_prompt(config.prompt, backbone, config.seed, search_sigma(config.optimizer))
    with _checked_against_the_model("head.template"):
        if not isinstance(prompt, IntrinsicPrompt | GeneratedIntrinsicPrompt):
            placement = (
                config.prompt.placement if isinstance(config.prompt, SoftPromptConfig) else "after-cls"
            )
            model = TextPromptClassifier(backbone, prompt, head, config.head.template, placement)
            return model, backbone.num_bytes()
        opt = config.optimizer
        chunk = opt.chunk_size if isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig) else 1
        model = IntrinsicTextClassifier(backbone, prompt, head, config.head.template, chunk)
        return model, backbone.num_bytes()


@contextmanager
def _checked_against_the_model(field: str) -> Iterator[None]:
    """Report a setting that only the loaded model could check (a [MASK]-less masked-LM template,
    label words sharing a first token, an init phrase of no tokens) as a ConfigError on ``field``."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{field}: {exc}") from exc


def _trainer(config: RunConfig, accelerator: Accelerator) -> LocalTrainer:
    """The local trainer the optimizer section describes: by gradient, black-box over z or a soft
    prompt, or BDPL's policy gradient over a discrete prompt; on a language-model backend, metered
    (what each round asked of it, in its own units)."""
    opt = config.optimizer
    if config.backbone.kind in LLM_BACKBONE_KINDS:
        if isinstance(opt, PolicyGradientOptimizerConfig):
            trainer: LocalTrainer = PolicyGradientTrainer(
                opt.samples,
                opt.lr,
                opt.steps,
                opt.batch_size,
                algorithm=opt.algorithm,
                weight_decay=opt.weight_decay,
                grad_clip=opt.grad_clip,
            )
        else:
            assert isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig)  # RunConfig refuses others
            trainer = build_blackbox_trainer(opt, config.strategy, accelerator.device, kseed_setup(config))
        return MeteredTrainer(trainer)
    if isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig):
        return build_blackbox_trainer(opt, config.strategy, accelerator.device, kseed_setup(config))
    if isinstance(config.prompt, ZooPFLPromptConfig):
        zoo = config.prompt
        return ZooPFLTrainer(
            gradient_optimizer(opt, accelerator),
            SPSASettings(lr=zoo.zo_lr, epsilon=zoo.zo_epsilon, budget=zoo.zo_budget),
            batch_size=opt.batch_size,
            zo_batch_size=zoo.zo_batch_size,
            device=accelerator.device,
            eval_batch_size=config.runtime.eval_batch_size,
        )
    settings = {
        "batch_size": opt.batch_size,
        "device": accelerator.device,
        "schedule": round_schedule(opt, config.federation.rounds),
    }
    if config.pseudo_labels is not None:
        return PseudoLabelTrainer(
            gradient_optimizer(opt, accelerator),
            pseudo=config.pseudo_labels,
            eval_batch_size=config.runtime.eval_batch_size,
            **settings,
        )
    return GradientTrainer(gradient_optimizer(opt, accelerator), **settings)
