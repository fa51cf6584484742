"""The method registry, filled from the entry-point group ``adapt_bench.methods`` (built-ins included)."""

from __future__ import annotations

from bench.method import Method
from bench.registry import AdaptBenchError, DuplicateNameError, Registry, iter_entry_points

ENTRY_POINT_GROUP = "adapt_bench.methods"
# Used when running from a source checkout without the distribution installed; the installed distribution
# declares the same targets in pyproject.toml.
_BUILTIN = {
    "random": "baselines.reference:RandomMethod",
    "oracle": "baselines.reference:OracleMethod",
    "ad": "baselines.ad:AlgorithmDistillation",
    "ed": "baselines.ad:ExpertDistillation",
    "ad-ctx0.5": "baselines.ad:ADContext0_5",
    "ad-ctx1": "baselines.ad:ADContext1",
    "ad-ctx2": "baselines.ad:ADContext2",
    "ad-ctx4": "baselines.ad:ADContext4",
    "ad-keep0.5": "baselines.ad:ADKeep0_5",
    "ad-keep0.75": "baselines.ad:ADKeep0_75",
    "ad-keep0.9": "baselines.ad:ADKeep0_9",
    "ad-prompt": "baselines.ad:ADPrompted",
    "ed-prompt": "baselines.ad:EDPrompted",
    "source-a2c": "baselines.source:SourceMethod",
    "rl2": "baselines.rl2:RL2Method",
    "drqv2": "baselines.drqv2:DrQV2",
    "drqv2-noaug": "baselines.drqv2:DrQV2NoAug",
    "drqv2-rr1": "baselines.drqv2:DrQV2RR1",
    "drqv2-rr2": "baselines.drqv2:DrQV2RR2",
    "drqv2-arr": "baselines.drqv2:DrQV2ARR",
    "drqv2-noaug-reset": "baselines.drqv2:DrQV2NoAugReset",
    "drqv2-noaug-inject": "baselines.drqv2:DrQV2NoAugInject",
    "drqv2-noaug-wd": "baselines.drqv2:DrQV2NoAugWeightDecay",
    "drqv2-noaug-l2init": "baselines.drqv2:DrQV2NoAugL2Init",
    "drqv2-noaug-layernorm": "baselines.drqv2:DrQV2NoAugLayerNorm",
    "drqv2-noaug-shrinkperturb": "baselines.drqv2:DrQV2NoAugShrinkPerturb",
    "drqv2-noaug-crelu": "baselines.drqv2:DrQV2NoAugCReLU",
    "drqv2-aug-early": "baselines.drqv2:DrQV2AugEarly",
    "drqv2-aug-late": "baselines.drqv2:DrQV2AugLate",
    "drqv2-frozen": "baselines.drqv2:DrQV2Frozen",
    "drqv2-noaug-frozen": "baselines.drqv2:DrQV2NoAugFrozen",
}


def _prepare(name: str, obj: object) -> Method:
    """An entry point may name a Method instance or a class whose no-argument constructor makes one."""
    if isinstance(obj, type):
        try:
            obj = obj()
        except TypeError as e:
            raise AdaptBenchError(f"method `{name}`: cannot instantiate {obj.__name__}() ({e})") from None
    if not isinstance(obj, Method):
        raise AdaptBenchError(f"method `{name}` ({obj!r}) does not implement name / supports(task) / run(ctx)")
    if obj.name != name:
        raise AdaptBenchError(f"method registered as `{name}` calls itself `{obj.name}`")
    return obj


_registry: Registry[Method] | None = None


def method_registry() -> Registry[Method]:
    """All methods: built-ins plus every installed plugin (entry points are read once, objects loaded lazily)."""
    global _registry
    if _registry is None:
        reg: Registry[Method] = Registry("method", hint="Run `bench list methods`.", prepare=_prepare)
        seen: dict[str, tuple[str, str]] = {}
        for name, target in _BUILTIN.items():
            seen[name] = (target, "adapt-bench")
        for name, target, dist in iter_entry_points(ENTRY_POINT_GROUP):
            if name in seen:
                if seen[name] == (target, dist) or (dist == "adapt-bench" and seen[name][0] == target):
                    continue
                raise DuplicateNameError(
                    f"method `{name}` is declared twice: by `{seen[name][1]}` ({seen[name][0]}) and by "
                    f"`{dist}` ({target}). Uninstall one of them or rename its method."
                )
            seen[name] = (target, dist)
        for name, (target, dist) in seen.items():
            reg.register(name, target, dist)
        _registry = reg
    return _registry


def get_method(name: str) -> Method:
    return method_registry().get(name)


def reset_registry() -> None:
    """Forget discovered plugins (tests install and uninstall packages)."""
    global _registry
    _registry = None
