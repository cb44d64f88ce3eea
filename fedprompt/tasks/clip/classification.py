"""Image classification with prompts on a frozen open_clip CLIP: config -> backbone, module, clients.

The sibling of ``tasks.text.classification``. Images are preprocessed with the backbone's own
transform and turned, once per dataset, into what the prompt module's image side reads
(``ImageInput``): CLIP image features for text-side prompts, hidden states below the first prompted
layer for VPT, pixels for pixel-space prompts. Those tensors go through ``FeatureCache`` (in memory;
on disk when ``backbone.feature_cache_dir`` is set).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Sequence

import datasets
import numpy as np
import torch

from fedprompt.config import (
    ConfigError,
    CoOpPromptConfig,
    FedAPTPromptConfig,
    FedDPTPromptConfig,
    GeneratorPromptConfig,
    OpenCLIPBackboneConfig,
    PixelPromptConfig,
    RunConfig,
    SPSAOptimizerConfig,
    TwinPromptConfig,
    VisualGeneratorPromptConfig,
    VPTPromptConfig,
)
from fedprompt.data.domains import load_domain_task
from fedprompt.data.images import ImageTask, load_image_task
from fedprompt.data.partition import partition_by_domain, partition_class_ranges, partition_indices
from fedprompt.errors import DataError
from fedprompt.federation.strategies.registry import build_strategy
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.tasks.clients import ClientData, HostedRows, build_clients
from fedprompt.tasks.clip.demo_backbone import backbone_notes
from fedprompt.tasks.clip.feature_cache import FeatureCache
from fedprompt.tasks.clip.parts import (
    ClipModel,
    build_domain_contexts,
    build_text_context,
    build_visual_side,
    encoded_images,
    image_cache_key,
    load_clip_backbone,
    part_settings,
)
from fedprompt.tasks.experiment import EvalSet, Experiment
from fedprompt.tasks.preflight import check_coupled_depth, vpt_layers
from fedprompt.training.augment import VIEWS, CropFlip, SeededTrainData, view_seed
from fedprompt.training.batching import TensorData
from fedprompt.training.blackbox import build_blackbox_trainer
from fedprompt.training.contrastive import ContrastiveTrainer
from fedprompt.training.device import make_accelerator
from fedprompt.training.domain import AdaptiveDomainTrainer
from fedprompt.training.gradient import GradientTrainer, LocalTrainer, gradient_optimizer, round_schedule
from optimizers.gradient import GradientOptimizer
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.clip_text_context import FixedClassText
from prompt_modules.domain_prompts import (
    DOMAIN,
    AdaptivePromptClassifier,
    DomainContexts,
    DualPromptClassifier,
)
from prompt_modules.prompt_generator import PromptGenerator
from prompt_modules.twin_prompt import CoupledVisualPrompt
from prompt_modules.visual_generator import BlackBoxCLIPClassifier, VisualPromptGenerator
from prompt_modules.visual_prompts import FrozenImage, VisualTokenPrompt, vpt_init


def build_clip_model(
    config: RunConfig, backbone: OpenCLIPBackbone, class_names: Sequence[str], domains: int = 0
) -> CLIPPromptClassifier | AdaptivePromptClassifier | DualPromptClassifier:
    """The prompt module the config asks for, on ``backbone``, scoring ``class_names`` (``domains``:
    how many domains clients train on, for Fed-DPT's prompt per domain)."""
    prompt, seed = config.prompt, config.seed
    if isinstance(prompt, FedAPTPromptConfig | FedDPTPromptConfig):
        return build_domain_model(config, backbone, class_names, domains)
    if isinstance(prompt, CoOpPromptConfig):
        text = build_text_context(prompt, backbone, class_names, seed, "prompt")
        return CLIPPromptClassifier(backbone, text, FrozenImage(), class_names)
    if isinstance(prompt, VPTPromptConfig | PixelPromptConfig):
        image = build_visual_side(prompt, backbone, seed, "prompt")
        return CLIPPromptClassifier(backbone, FixedClassText(prompt.class_template), image, class_names)
    if isinstance(prompt, GeneratorPromptConfig):
        generator = PromptGenerator(
            prompt.num_tokens,
            backbone.text_width,
            backbone.embed_dim,
            heads=prompt.heads,
            ff_mult=prompt.ff_mult,
            self_attention_layers=prompt.self_attention_layers,
            template=prompt.name_template,
            init_std=prompt.init_std,
            seed=derive_seed(seed, "prompt-init", "generator"),
        )
        return CLIPPromptClassifier(backbone, generator, FrozenImage(), class_names)
    if isinstance(prompt, VisualGeneratorPromptConfig):
        generator = VisualPromptGenerator(
            prompt.grid, prompt.hidden, prompt.prompt_size, prompt.scale, derive_seed(seed, "prompt-init")
        )
        return BlackBoxCLIPClassifier(backbone, FixedClassText(prompt.class_template), generator, class_names)
    if isinstance(prompt, TwinPromptConfig):
        text = build_text_context(prompt.text, backbone, class_names, seed, "prompt.text")
        if prompt.coupled:
            assert isinstance(prompt.visual, VPTPromptConfig)  # TwinPromptConfig guarantees it
            layers = vpt_layers(prompt.visual, backbone.num_vision_layers, "prompt.visual")
            check_coupled_depth(prompt.visual.start_layer, layers, text.depth)
            if prompt.visual.num_tokens != text.num_tokens:
                raise ConfigError(
                    f"prompt.visual.num_tokens: {prompt.visual.num_tokens} must equal the text context's "
                    f"{text.num_tokens} vectors (from prompt.text.init_text) when coupled"
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "prompt-init", "coupling"))
                image = CoupledVisualPrompt(
                    backbone.text_width,
                    backbone.vision_width,
                    layers,
                    prompt.visual.start_layer,
                    placement=prompt.visual.placement,
                )
        else:
            image = build_visual_side(prompt.visual, backbone, seed, "prompt.visual")
        settings = {
            "text": part_settings(prompt.text_optimizer),
            "image": part_settings(prompt.visual_optimizer),
        }
        return CLIPPromptClassifier(backbone, text, image, class_names, settings)
    raise ConfigError(f"prompt.kind {prompt.kind!r} is not a CLIP prompt")


def build_domain_model(
    config: RunConfig, backbone: OpenCLIPBackbone, class_names: Sequence[str], domains: int
) -> AdaptivePromptClassifier | DualPromptClassifier:
    """FedAPT's keyed context and adaptive network (one key per client, each drawn uniform in
    [0, 1) from the run seed and the client), or Fed-DPT's text prompt per domain and visual token
    per domain."""
    prompt, seed = config.prompt, config.seed
    if isinstance(prompt, FedAPTPromptConfig):
        text = build_text_context(prompt.context, backbone, class_names, seed, "prompt.context")
        keys = torch.stack(
            [
                torch.rand(
                    text.context.shape[-2:], generator=torch_generator(derive_seed(seed, "fedapt-key", cid))
                )
                for cid in range(config.partition.num_clients)
            ]
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "prompt-init", "adaptive"))
            return AdaptivePromptClassifier(
                backbone, text, keys, class_names, prompt.temperature, prompt.test_mixture
            )
    assert isinstance(prompt, FedDPTPromptConfig)  # build_clip_model dispatches on the two kinds
    if domains < 1:
        raise ConfigError(
            "prompt.kind fed-dpt keeps a prompt per domain: it needs multi-domain images (data.source: "
            "domain-folder, or the builtin digit-domains) and partition.kind: domains"
        )
    if prompt.visual_start_layer >= backbone.num_vision_layers:
        raise ConfigError(
            f"prompt.visual_start_layer: {prompt.visual_start_layer} is past the last vision layer "
            f"(0..{backbone.num_vision_layers - 1})"
        )
    contexts = build_domain_contexts(prompt.text, backbone, domains, seed, "prompt.text")
    tokens = vpt_init(backbone, 1, domains, torch_generator(derive_seed(seed, "prompt-init", "vpt")))
    settings = {"text": part_settings(prompt.text_optimizer), "image": part_settings(prompt.visual_optimizer)}
    return DualPromptClassifier(
        backbone,
        DomainContexts(contexts, prompt.text.class_position),
        VisualTokenPrompt(tokens, prompt.visual_start_layer, placement=prompt.placement),
        class_names,
        settings,
    )


# --------------------------------------------------------------------------- data


def image_tensors(
    model: ClipModel,
    dataset: datasets.Dataset,
    cache: FeatureCache,
    batch_size: int,
) -> TensorData:
    """The dataset as the model's image input (cached, computed once) plus ``labels``."""
    values = encoded_images(model, dataset, cache, batch_size)
    labels = torch.tensor(dataset["label"], dtype=torch.long)
    return TensorData({model.image_input.key: values, "labels": labels})


def augmented_views(
    model: ClipModel,
    dataset: datasets.Dataset,
    rows: np.ndarray,
    augment: CropFlip,
    views: int,
    seed: int,
    cache: FeatureCache,
    batch_size: int,
) -> torch.Tensor:
    """Image features [N, K, D] of K augmented views of each image (cached, computed once).

    View k of the image at row r of the full training set is ``augment`` with seed
    ``view_seed(seed, r, k)``: the same whichever clients a process builds.
    """
    backbone: OpenCLIPBackbone = model.backbone

    def compute() -> torch.Tensor:
        chunks = []
        for start in range(0, len(dataset), batch_size):
            pixels = backbone.preprocess_images(dataset[start : start + batch_size]["image"])
            stacked = torch.stack(
                [
                    augment(image, view_seed(seed, int(row), k))
                    for image, row in zip(pixels, rows[start : start + batch_size], strict=True)
                    for k in range(views)
                ]
            )
            features = model.prepare_images(stacked.to(backbone.device)).cpu()
            chunks.append(features.reshape(len(pixels), views, -1))
        return torch.cat(chunks)

    parts = image_cache_key(model, dataset, f"{model.image_input.name}-views")
    parts["augment"] = f"{augment!r} views={views} seed={derive_seed(seed, 'augment-view')}"
    parts["rows"] = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()
    return cache.get(parts, compute)


def pixel_tensor(
    backbone: OpenCLIPBackbone,
    dataset: datasets.Dataset,
    cache: FeatureCache,
    batch_size: int,
    model: ClipModel,
) -> torch.Tensor:
    """Preprocessed images [N, 3, H, W] of the dataset (kept in memory only: cheap to redo)."""

    def compute() -> torch.Tensor:
        return torch.cat(
            [
                backbone.preprocess_images(dataset[i : i + batch_size]["image"])
                for i in range(0, len(dataset), batch_size)
            ]
        )

    return cache.get(image_cache_key(model, dataset, "pixels"), compute, persist=False)


def seeded_train_data(
    data: TensorData, replacements: dict[str, torch.Tensor], augment: CropFlip | None
) -> SeededTrainData:
    """A client's training data whose batches carry the step's randomness (``SeededTrainData``):
    cached views (``VIEWS``) replace the plain image features, pixels the cached hidden states (VPT
    then runs the whole tower on augmented images)."""
    tensors = dict(data.tensors)
    if VIEWS in replacements:
        tensors.pop("image_features", None)
    if "pixels" in replacements:
        tensors.pop("image_tokens", None)
    tensors.update(replacements)
    return SeededTrainData(tensors, augment=augment if "pixels" in tensors else None)


def relabel(data: TensorData, classes: np.ndarray) -> TensorData:
    """``data`` with its labels renumbered within ``classes`` (sorted label values): c -> index of c."""
    labels = torch.as_tensor(np.searchsorted(classes, data.labels.numpy()), dtype=torch.long)
    return TensorData({**data.tensors, "labels": labels})


# --------------------------------------------------------------------------- experiment


def _trainer(config: RunConfig, optimizer: GradientOptimizer, device: torch.device) -> LocalTrainer:
    prompt, batch_size = config.prompt, config.optimizer.batch_size
    schedule = round_schedule(config.optimizer, config.federation.rounds)
    if isinstance(prompt, FedAPTPromptConfig):
        return AdaptiveDomainTrainer(
            optimizer, batch_size, device, schedule, domain_weight=prompt.domain_loss_weight
        )
    if isinstance(prompt, TwinPromptConfig) and prompt.contrastive:
        return ContrastiveTrainer(
            optimizer,
            batch_size,
            device,
            ce_weight=prompt.ce_weight,
            temperature=prompt.temperature,
            eval_batch_size=config.runtime.eval_batch_size,
            text_contrast=prompt.contrast == "image-and-text",
            schedule=schedule,
        )
    return GradientTrainer(optimizer, batch_size, device, schedule)


def _random_visual_prompt(config: RunConfig) -> bool:
    """Whether the visual prompt draws random numbers while training (it then reads the step's seed)."""
    prompt = config.prompt
    visual = prompt.visual if isinstance(prompt, TwinPromptConfig) else prompt
    if isinstance(visual, PixelPromptConfig):
        return visual.method == "random-patch"
    return isinstance(visual, VPTPromptConfig) and visual.dropout > 0


def _partition(config: RunConfig, task: ImageTask, labels: np.ndarray) -> list[np.ndarray]:
    seed = derive_seed(config.seed, "partition")
    if config.partition.kind == "domains":
        if task.domain_names is None:
            raise ConfigError("partition.kind domains needs multi-domain images")
        try:
            return partition_by_domain(
                np.asarray(task.train["domain"], dtype=np.int64),
                len(task.domain_names),
                config.partition.clients_per_domain,
                config.partition.num_clients,
                seed,
            )
        except DataError as exc:
            raise ConfigError(str(exc)) from None
    if task.datasets is None:
        return partition_indices(labels, config.partition, seed=seed)
    try:
        return partition_class_ranges(
            labels,
            [d.classes for d in task.datasets],
            config.partition.classes_per_client,
            config.partition.num_clients,
        )
    except DataError as exc:
        raise ConfigError(str(exc)) from None


def _eval_sets(
    model: ClipModel, task: ImageTask, test: TensorData, cache: FeatureCache, batch: int
) -> dict[str, EvalSet]:
    """Base and novel classes (base-to-novel runs) and, for pooled datasets, each dataset apart:
    ``<label>_base`` and ``<label>_novel`` (grouped into ``base`` and ``novel``, their mean over
    datasets as FedTPG reports it), or ``<label>`` (grouped into ``dataset_mean``)."""
    if task.domain_names is not None:
        return _domain_eval_sets(model, task, test, cache, batch)
    novel = image_tensors(model, task.novel_test, cache, batch) if task.novel_test is not None else None
    if task.datasets is None:
        if novel is None or task.novel_names is None:
            return {}
        return {
            "base": EvalSet(test, list(task.class_names)),
            "novel": EvalSet(novel, list(task.novel_names)),
        }

    def part(data: TensorData, names: list[str], span: tuple[int, int], group: str) -> EvalSet:
        rows = np.flatnonzero((data.labels.numpy() >= span[0]) & (data.labels.numpy() < span[1]))
        return EvalSet(
            relabel(data.subset(rows), np.arange(span[0], span[1])), names[span[0] : span[1]], group
        )

    sets = {}
    for dataset in task.datasets:
        if novel is None or task.novel_names is None or dataset.novel_classes is None:
            sets[dataset.label] = part(test, task.class_names, dataset.classes, "dataset_mean")
            continue
        sets[f"{dataset.label}_base"] = part(test, task.class_names, dataset.classes, "base")
        sets[f"{dataset.label}_novel"] = part(novel, task.novel_names, dataset.novel_classes, "novel")
    return sets


def _domain_eval_sets(
    model: ClipModel, task: ImageTask, test: TensorData, cache: FeatureCache, batch: int
) -> dict[str, EvalSet]:
    """Each trained domain's test images apart (``domain_<name>``; their mean ``domain_mean`` and
    worst ``domain_worst``), and the held-out domain's (``held_out``); no image says its domain."""
    assert task.domain_names is not None
    names, domains = list(task.class_names), np.asarray(task.test["domain"], dtype=np.int64)
    sets = {
        f"domain_{_metric_name(domain)}": EvalSet(
            test.subset(np.flatnonzero(domains == index)), names, "domain_mean", worst_group="domain_worst"
        )
        for index, domain in enumerate(task.domain_names)
    }
    if task.held_out_test is not None:
        sets["held_out"] = EvalSet(image_tensors(model, task.held_out_test, cache, batch), names)
    return sets


def _metric_name(domain: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", domain.lower()).strip("-") or "domain"


def _client_domains(config: RunConfig, parts: list[np.ndarray]) -> dict[int, int] | None:
    """Each client's domain under ``partition.kind: domains`` (clients are numbered domain by domain)."""
    if config.partition.kind != "domains":
        return None
    return {cid: cid // config.partition.clients_per_domain for cid in range(len(parts))}


def _key_of(config: RunConfig, cid: int, client_domains: dict[int, int] | None) -> int | None:
    """What the client's examples carry as their ``domain``: its own key (FedAPT), its domain's
    prompt (Fed-DPT), or nothing (every other prompt)."""
    if isinstance(config.prompt, FedAPTPromptConfig):
        return cid
    if isinstance(config.prompt, FedDPTPromptConfig):
        assert client_domains is not None  # the config refuses fed-dpt without domain clients
        return client_domains[cid]
    return None


def with_domain(data: TensorData, domain: int) -> TensorData:
    """``data`` with every example's ``domain`` set to ``domain``."""
    return TensorData({**data.tensors, DOMAIN: torch.full((len(data),), domain, dtype=torch.long)})


def build_vision_experiment(config: RunConfig, client_ids: Collection[int] | None = None) -> Experiment:
    """Load images and CLIP, build the prompt module, encode images once, partition, make the clients.

    With ``client_classes: own`` each client scores only the classes in its own data (its labels
    renumbered within them); the server scores the test set against every training class, and
    base/novel (and each pooled dataset) against their own class names.
    """
    assert isinstance(config.backbone, OpenCLIPBackboneConfig)  # experiment.py dispatches on the kind
    accelerator = make_accelerator(config.runtime)
    load = load_domain_task if config.data.multi_domain else load_image_task
    task = load(config.data, seed=derive_seed(config.seed, "data"))
    backbone = load_clip_backbone(config.backbone, config.seed).to(accelerator.device)
    model = build_clip_model(config, backbone, task.class_names, len(task.domain_names or []))
    model.to(accelerator.device).eval()

    labels = np.asarray(task.train["label"], dtype=np.int64)
    parts = _partition(config, task, labels)
    client_domains = _client_domains(config, parts)
    rows = HostedRows.of(parts, client_ids)  # encode only the hosted clients' images (a SuperNode hosts one)
    needed, built = rows.needed, list(rows.positions)
    cache = FeatureCache(config.backbone.feature_cache_dir)
    batch = config.runtime.eval_batch_size
    subset = task.train if len(needed) == len(task.train) else task.train.select(needed)
    # a process with no clients (a Flower ServerApp) encodes no training images at all
    train = image_tensors(model, subset, cache, batch) if built else None
    test = image_tensors(model, task.test, cache, batch)

    augment_config = config.vision.augment
    augment = None
    replacements: dict[str, torch.Tensor] = {}  # training inputs that differ from the evaluation ones
    if augment_config is not None:
        augment = CropFlip(scale=augment_config.crop_scale, flip=augment_config.flip)
        if built and model.image_input.key == "image_features":  # text-side prompts: K cached views
            replacements[VIEWS] = augmented_views(
                model, subset, needed, augment, augment_config.views, config.seed, cache, batch
            )
        elif built and model.image_input.key == "image_tokens":  # VPT: the tower runs on augmented pixels
            replacements["pixels"] = pixel_tensor(backbone, subset, cache, batch, model)
    seeded = augment is not None or _random_visual_prompt(config)

    opt = config.optimizer
    if isinstance(opt, SPSAOptimizerConfig):  # a visual prompt generator against CLIP's logits (Fed-BBPT)
        black_box = build_blackbox_trainer(opt, config.strategy, accelerator.device)

        def trainer(cid: int) -> LocalTrainer:
            return black_box
    else:
        optimizer = gradient_optimizer(opt, accelerator)

        def trainer(cid: int) -> LocalTrainer:
            return _trainer(config, optimizer, accelerator.device)

    own_classes = config.client_classes == "own"

    def share(cid: int, local_train: np.ndarray, local_val: np.ndarray) -> ClientData:
        """The client's rows relabelled within its classes (``own``), with the step's randomness."""
        assert train is not None
        classes = np.unique(labels[parts[cid]]) if own_classes else np.arange(len(task.class_names))
        train_k = relabel(train.subset(local_train), classes)
        key = _key_of(config, cid, client_domains)
        if key is not None:
            train_k = with_domain(train_k, key)
        if seeded:
            positions = torch.as_tensor(local_train)
            train_k = seeded_train_data(train_k, {k: v[positions] for k, v in replacements.items()}, augment)
        val_k = relabel(train.subset(local_val), classes) if len(local_val) else None
        return ClientData(train_k, val_k, [task.class_names[c] for c in classes] if own_classes else None)

    # one trainer per client: ATPFL keeps client state in it
    clients = build_clients(config, model, train, rows, trainer, share)
    return Experiment(
        model=model,
        clients=clients,
        test_data=test,
        strategy=build_strategy(
            config.strategy,
            run=config,
            client_domains=client_domains,
            prompt_tensors=model.prompt_tensor_names(),
        ),
        device=accelerator.device,
        backbone_bytes=backbone.num_bytes(),
        label_names=list(task.class_names),
        eval_sets=_eval_sets(model, task, test, cache, batch),
        notes={**backbone_notes(config.backbone), **_domain_notes(task)},
        client_domains=client_domains,
    )


def _domain_notes(task: ImageTask) -> dict[str, object]:
    """What a run summary records of multi-domain images: the trained and the held-out domains."""
    if task.domain_names is None:
        return {}
    return {"domains": {"trained": list(task.domain_names), "held_out": task.held_out_domain}}
