"""The methods the app compares, each a fedprompt run configuration derived from the user's one."""

from __future__ import annotations

from collections.abc import Sequence

from fedprompt.config import ConfigError, ReliabilityConfig, RunConfig, load_config

METHODS: dict[str, str] = {
    "personalised": "own twin prompt per client, reliability-weighted shared prompt (strategy reliability)",
    "fedavg": "one global twin prompt, FedAvg",
    "local": "own twin prompt per client, trained alone (reliability with alpha 0)",
}
"""Method name -> what it is. ``personalised`` and ``local`` are scored with each client's own prompt,
``fedavg`` with the global one."""

PERSONAL_METHODS = ("personalised", "local")


def check_app_config(config: RunConfig) -> None:
    """The app runs VQA prompts on clients formed from a field, with reliability weighting as its
    method; raises ConfigError naming the field and the fix otherwise."""
    if config.data.source != "vqa" or config.data.vqa is None:
        raise ConfigError("data.source: the medical VQA app needs data.source: vqa with a data.vqa section")
    if config.data.vqa.client_field is None:
        raise ConfigError(
            "data.vqa.client_field: the app reports each client's test questions, so clients are the values "
            "of a field (vqa-rad: organ; slake: organ or modality; easy-vqa: shape, color or question_type)"
        )
    if not isinstance(config.strategy, ReliabilityConfig):
        raise ConfigError(
            f"strategy.kind: the app's personalised method is reliability weighting; got "
            f"{config.strategy.kind!r}, set strategy: {{kind: reliability, alpha: 1.0}} "
            "(FedAvg and local-only run as its baselines)"
        )
    if config.personalization.shared_tokens is not None:
        raise ConfigError(
            "personalization.shared_tokens: the app keeps a whole personal prompt per client; remove it "
            "(personalization.local may keep whole tensors on each client, e.g. the fusion head)"
        )


def method_configs(config: RunConfig, methods: Sequence[str]) -> dict[str, RunConfig]:
    """One run configuration per method, equal to ``config`` (data, partition, seed, prompt,
    optimiser, rounds) but for the strategy and the run's name; ``fedavg`` shares every tensor of
    its one global prompt (no ``personalization.local``: a fusion head kept on the clients would
    leave the global prompt with its initial one)."""
    check_app_config(config)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"methods: {unknown or 'none given'}; choose among {list(METHODS)}")
    strategies = {
        "personalised": config.strategy.model_dump(mode="json"),
        "fedavg": {"kind": "fedavg"},
        "local": {"kind": "reliability", "alpha": 0.0},
    }
    out = {}
    for method in methods:
        data = config.model_dump(mode="json")
        data.update(name=f"{config.name}-{method}", strategy=strategies[method])
        if method == "fedavg":
            data["personalization"] = {**data["personalization"], "local": []}
        out[method] = load_config(data)
    return out
