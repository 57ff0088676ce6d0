"""How tpmoe runs one transformers MoE block, judged from its code piece by piece (registry.py).

`plan_for(module)` judges an instance (what `tpmoe.hf.apply` meets) and returns a Plan:
  mode "block":   the block's forward is a BLOCKS structure and its shared expert (if any) a
                  SHARED MLP with the routed experts' activation: the whole block becomes a
                  tpmoe.MoEBlock (router native where ROUTERS has its code, else the family's
                  own router module kept), shared expert sharded in the same all-reduce;
  mode "experts": any other block whose experts loop is in EXPERTS: only its experts module
                  is replaced; the block's own forward runs around it, replicated.
`judge_class(cls)` reads the same decision (`_decide`) from the classes alone, for
`python -m tpmoe.hf.families`.
Anything else raises UnsupportedFamilyError naming the family, the class and the reason.
"""
import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..config import ExpertSpec
from . import registry as R
from .code import assigned_class, assigns, family_of, forward_code, method_code, normalized_code, reference_class


class UnsupportedFamilyError(TypeError):
    """An MoE block of a family (or a variant) that tpmoe does not run; names family and class."""


# --------------------------------------------------------------------------- activations

# transformers activation module classes -> tpmoe activation names (compared by class name, so
# that transformers need not be imported here). The python variants (use_gelu_python=True...)
# compute the same function, only slower; NewGELUActivation is the tanh approximation written out.
_ACTIVATION_CLASSES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                       "NewGELUActivation": "gelu_tanh", "ReLU": "relu", "ReLUSquaredActivation": "relu2"}
_ACTIVATION_FUNCTIONS = {torch.nn.functional.silu: "silu", torch.nn.functional.relu: "relu"}


def activation_of(act_fn) -> str:
    """The tpmoe activation an HF act_fn computes; raises registry.Unsupported otherwise."""
    if act_fn in _ACTIVATION_FUNCTIONS:
        return _ACTIVATION_FUNCTIONS[act_fn]
    name = type(act_fn).__name__
    if name == "GELU" and isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    if name not in _ACTIVATION_CLASSES:
        raise R.Unsupported(f"activation {type(act_fn).__module__}.{name} has no tpmoe counterpart (supported: "
                            f"{sorted(set(_ACTIVATION_CLASSES.values()) | {'gelu'})})")
    return _ACTIVATION_CLASSES[name]


# --------------------------------------------------------------------------- reference code


def _installed_code(family: str, class_name: str, method: str = "forward") -> Optional[str]:
    """The normalised code of a registry reference in the installed transformers, or None where
    that release lacks the family or the class (an older one): its entry then matches nothing,
    and the blocks it would have matched are refused with the usual reason, not an ImportError."""
    try:
        cls = reference_class(family, class_name)
    except (ImportError, AttributeError):
        return None
    return method_code(cls, method)


@functools.lru_cache(maxsize=None)
def _codes(kind: str) -> Dict[str, object]:
    """normalised code -> registry entry, for one kind of piece.

    Where two entries' installed code is the same, the first (registry order: the general piece
    before its variants) wins: a family that a release rewrote into the standard code (LongCat's
    experts in transformers 5.25) is then the standard piece, not its old variant's layout."""
    pairs = []  # (code, entry) in registry order
    if kind == "experts":
        for impl in R.EXPERTS:
            pairs.append((_installed_code(impl.family, impl.class_name), impl))
    elif kind == "gates":
        for impl in R.GATES:
            if (impl.family, impl.class_name) == R.DEFAULT_GATE:
                from transformers.integrations import moe
                default_gate = getattr(moe, "_default_apply_gate", None)
                pairs.append((None if default_gate is None else normalized_code(default_gate), impl))
            else:
                pairs.append((_installed_code(impl.family, impl.class_name, "_apply_gate"), impl))
    elif kind == "shared":
        for impl in R.SHARED:
            pairs.append((_installed_code(impl.family, impl.class_name), impl))
    elif kind == "routers":
        for impl in R.ROUTERS:
            pairs.append((_installed_code(impl.family, impl.class_name), impl))
    elif kind == "blocks":
        for impl in R.BLOCKS:
            pairs.append((_installed_code(impl.family, impl.class_name), impl))
    elif kind == "activation_modules":
        for gate in R.GATES:
            for family, class_name in gate.activation_modules:
                pairs.append((_installed_code(family, class_name), (family, class_name)))
    table = {}
    for code, entry in pairs:
        if code is not None:  # a reference the installed release lacks matches nothing
            table.setdefault(code, entry)
    return table


# --------------------------------------------------------------------------- experts


@dataclass(frozen=True)
class ExpertsPlan:
    """How tpmoe reads an experts module: its tpmoe layout, the HF tensors that need a transpose
    into it (transformers' transposed concatenated storage), and the activation."""

    impl: R.ExpertsImpl
    layout: str
    gated: bool
    bias: bool
    transposed_names: Tuple[str, ...]
    activation: str
    alpha: float
    limit: float

    @property
    def spec(self) -> ExpertSpec:
        return ExpertSpec(self.activation, self.layout, self.gated, self.alpha, self.limit)

    def hf_names(self) -> Dict[str, Tuple[str, ...]]:
        """tpmoe weight -> the experts module's parameter names."""
        if self.impl.storage == "dbrx":
            return {"w_gate_up": ("mlp.w1", "mlp.v1"), "w_down": ("mlp.w2",)}
        if self.impl.storage == "jetmoe":
            return {"w_gate_up": ("input_linear.weight",), "w_down": ("output_linear.weight",)}
        up = "gate_up_proj" if self.gated else "up_proj"
        names = {"w_gate_up": (up,), "w_down": ("down_proj",)}
        if self.bias:
            names.update(b_gate_up=(f"{up}_bias",), b_down=("down_proj_bias",))
        return names


def _layout(impl: R.ExpertsImpl) -> Tuple[str, Tuple[str, ...]]:
    if not impl.concatenated and impl.gate != "none":
        # tpmoe reads the interleaved transposed storage in place (GPT-OSS's "gpt_oss" layout).
        return ("gpt_oss" if impl.transposed else "interleaved"), ()
    return "concatenated", (("w_gate_up", "w_down") if impl.transposed else ())


def _flags_agree(impl: R.ExpertsImpl, flags: Dict[str, bool]) -> Optional[str]:
    """None, or what differs between @use_experts_implementation's flags and the verified loop's layout."""
    expected = dict(is_concatenated=impl.concatenated, is_transposed=impl.transposed, has_bias=impl.bias,
                    has_gate=impl.gate != "none", has_post_expert_norm=impl.post_norm is not None)
    wrong = [f"{name}={flags[name]}" for name in expected if name in flags and bool(flags[name]) != expected[name]]
    return ", ".join(wrong) or None


def _decorator_flags_of_class(experts_class: type) -> Dict[str, bool]:
    """The flags @use_experts_implementation closed over (the class itself has none until built)."""
    init = experts_class.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    if code is None or not init.__closure__:
        return {}
    cells = dict(zip(code.co_freevars, init.__closure__))
    return {name: cells[name].cell_contents for name in ("is_concatenated", "is_transposed", "has_bias", "has_gate",
                                                         "has_post_expert_norm") if name in cells}


def _experts_impl(experts_class: type, flags: Dict[str, bool]) -> R.ExpertsImpl:
    refused = R.REFUSED_EXPERTS.get(f"{family_of(experts_class)}.{experts_class.__name__}")
    if refused is not None:
        raise R.Unsupported(f"experts {experts_class.__name__}: {refused}")
    impl = _codes("experts").get(forward_code(experts_class))
    if impl is None:
        raise R.Unsupported(f"experts {experts_class.__name__}: its loop matches no verified experts implementation "
                            f"(per-expert modules, a custom loop or a new layout)")
    wrong = _flags_agree(impl, flags)
    if wrong:
        raise R.Unsupported(f"experts {experts_class.__name__}: its flags ({wrong}) contradict the loop it runs")
    return impl


def _gate_impl(experts_class: type) -> R.GateImpl:
    gate = _codes("gates").get(method_code(experts_class, "_apply_gate"))
    if gate is None:
        raise R.Unsupported(f"experts {experts_class.__name__}: its _apply_gate matches no verified gate")
    return gate


def experts_plan(experts: nn.Module) -> ExpertsPlan:
    """The ExpertsPlan of an experts module instance; raises registry.Unsupported with the reason."""
    experts_class = type(experts)
    flags = {name: getattr(experts, name) for name in ("is_concatenated", "is_transposed", "has_bias", "has_gate",
                                                       "has_post_expert_norm") if hasattr(experts, name)}
    if getattr(experts, "_is_expert_parallel", False):
        raise R.Unsupported(f"experts {experts_class.__name__} are set up for transformers' expert parallelism")
    impl = _experts_impl(experts_class, flags)
    if impl.gate in ("inline", "none"):
        activation, alpha, limit = R.plain_activation(experts, activation_of, impl.act)
    else:
        gate = _gate_impl(experts_class)
        layout_split = "concatenated" if impl.concatenated else "interleaved"
        if gate.split != layout_split:
            raise R.Unsupported(f"experts {experts_class.__name__}: _apply_gate splits {gate.split} columns, the "
                                f"weights are {layout_split}")
        if gate.activation_modules:
            _check_activation_modules(experts.act_fn)
        activation, alpha, limit = gate.read(experts, activation_of)
    layout, transposed = _layout(impl)
    return ExpertsPlan(impl=impl, layout=layout, gated=impl.gate != "none", bias=impl.bias,
                       transposed_names=transposed, activation=activation, alpha=alpha, limit=limit)


def _check_activation_modules(act_fn: nn.Module) -> None:
    known = _codes("activation_modules")
    for module in act_fn.modules():
        if forward_code(module) not in known:
            raise R.Unsupported(f"activation module {type(module).__name__}: its code matches no verified one")


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class SharedPlan:
    impl: R.SharedImpl
    attribute: str
    gate_attribute: Optional[str]


@dataclass(frozen=True)
class Plan:
    """mode "block" (block, router: a native RouterImpl or None for the family's module, shared)
    or "experts" (experts only). note: why a block-shaped forward fell back to experts mode."""

    mode: str
    experts: ExpertsPlan
    block: Optional[R.BlockImpl] = None
    router: Optional[R.RouterImpl] = None
    shared: Optional[SharedPlan] = None
    note: str = ""

    def replaced(self, block: nn.Module) -> nn.Module:
        """The module tpmoe replaces, whose HF weights it takes: the block, or its experts module."""
        return block if self.mode == "block" else block.experts


def is_moe_block(module: nn.Module) -> bool:
    """A module holding routed experts next to a router: what `apply` must either swap or refuse.

    The experts of every family hold 3-D `gate_up_proj`/`up_proj` and `down_proj` parameters (or,
    in older layouts, a list of expert modules); either way the block is the parent of the
    `experts` child that also owns a router-like child."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return _own_experts_block(module) is not None
    return any(isinstance(getattr(module, name, None), nn.Module) for name in ("gate", "router"))


def _own_experts_block(module_or_class) -> Optional[R.BlockImpl]:
    """The BLOCKS structure of a block that holds its expert weights itself (JetMoE), or None."""
    impl = _codes("blocks").get(forward_code(module_or_class))
    return impl if impl is not None and impl.experts is None else None


def unsupported(module_or_class, name: str, reason: str) -> UnsupportedFamilyError:
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    return UnsupportedFamilyError(f"model: the MoE block {name or '<root>'} is {cls.__module__}.{cls.__qualname__} of "
                                  f"the family {family_of(cls)!r}, which tpmoe does not support: {reason} (see "
                                  f"tpmoe/hf/registry.py)")


def _block_fallback(module: nn.Module, impl: R.BlockImpl, experts: ExpertsPlan) -> Tuple[Optional[SharedPlan], str]:
    """The shared expert of a BLOCKS-shaped block, or the reason it must run in experts mode."""
    if impl.shared is None:
        return None, ""
    shared = getattr(module, impl.shared, None)
    if shared is None:
        return (None, "") if impl.shared_optional else (None, f"no {impl.shared}")
    shared_impl = _codes("shared").get(forward_code(shared))
    if shared_impl is None:
        return None, f"its {impl.shared} ({type(shared).__name__}) matches no verified shared-expert MLP"
    try:
        activation, alpha, limit = shared_impl.read(shared, activation_of)
    except R.Unsupported as error:
        return None, f"its {impl.shared}: {error}"
    if (activation, alpha, limit) != (experts.activation, experts.alpha, experts.limit):
        return None, (f"its {impl.shared} runs {activation} (alpha {alpha}, limit {limit}), the routed experts "
                      f"{experts.activation} (alpha {experts.alpha}, limit {experts.limit}): one activation for both")
    linears = [module_ for module_ in shared.modules() if isinstance(module_, nn.Linear)]
    if any(linear.bias is not None for linear in linears):
        return None, f"its {impl.shared} has biased projections"
    if impl.shared_gate is not None:
        gate = getattr(module, impl.shared_gate, None)
        if not isinstance(gate, nn.Linear) or gate.bias is not None or gate.out_features != 1:
            return None, f"its {impl.shared_gate} is not an unbiased Linear(H, 1)"
    return SharedPlan(shared_impl, impl.shared, impl.shared_gate), ""


_WEIGHTED_INPUTS = ("its experts take inputs already scaled by the routing weights (Llama-4's loop), which only "
                    "a verified block structure that applies the weights to the input can drive")


# --------------------------------------------------------------------------- the decision, once


class _WeightedInputs(R.Unsupported):
    """The refusal of experts that take weighted inputs; note: why the block's own structure
    could not drive them (empty when it matched no verified one)."""

    def __init__(self, note: str):
        super().__init__(f"{_WEIGHTED_INPUTS}; {note}" if note else _WEIGHTED_INPUTS)


class _Verdict(NamedTuple):
    """What `_decide` found: mode "block" or "experts", and what the view read on the way."""

    mode: str
    experts: object  # the view's reading of the experts: an ExpertsPlan (instance), an ExpertsImpl (class)
    block: Optional[R.BlockImpl] = None
    router: Optional[R.RouterImpl] = None
    shared: Optional[SharedPlan] = None
    note: str = ""


def _decide(view) -> _Verdict:
    """How a block runs, or R.Unsupported with the reason: the one decision behind plan_for
    (an instance) and judge_class (a class). The view answers what only it can see: an instance
    its configured modules, a class the classes its __init__ assigns."""
    if view.key in R.NOT_EXPERT_BLOCKS:
        raise R.Unsupported(R.NOT_EXPERT_BLOCKS[view.key])
    experts = view.experts()
    impl = view.experts_impl(experts)
    block = _codes("blocks").get(view.forward_code())
    if impl.post_norm is not None:
        block = None  # the per-expert norm runs where the experts module runs: experts mode
    note = ""
    if block is not None and view.has_router(block.router):
        shared, note = view.shared(block, experts)
        if not note:
            return _Verdict("block", experts, block=block, router=view.router(block.router), shared=shared)
    if impl.weighted_inputs:
        raise _WeightedInputs(note)
    return _Verdict("experts", experts, note=note)


class _InstanceView:
    """A block instance, as `tpmoe.hf.apply` meets it: its modules and their configuration."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.key = f"{family_of(type(module))}.{type(module).__name__}"

    def forward_code(self):
        return forward_code(self.module)

    def experts(self) -> ExpertsPlan:
        module = self.module
        return experts_plan(module.experts if _own_experts_block(module) is None else module)

    @staticmethod
    def experts_impl(experts: ExpertsPlan) -> R.ExpertsImpl:
        return experts.impl

    def has_router(self, attribute: str) -> bool:
        return isinstance(getattr(self.module, attribute, None), nn.Module)

    def shared(self, block: R.BlockImpl, experts: ExpertsPlan) -> Tuple[Optional[SharedPlan], str]:
        return _block_fallback(self.module, block, experts)

    def router(self, attribute: str) -> Optional[R.RouterImpl]:
        return _codes("routers").get(forward_code(getattr(self.module, attribute)))


class _ClassView:
    """A block class, as the scan meets it: the classes its __init__ assigns. What only an
    instance shows (the configured activation, a limit of None, which of gate and router holds
    the router) it cannot check, and takes as the instance would pass it."""

    def __init__(self, cls: type):
        self.cls = cls
        self.key = f"{family_of(cls)}.{cls.__name__}"

    def forward_code(self):
        return forward_code(self.cls)

    def experts(self) -> R.ExpertsImpl:
        experts_class = assigned_class(self.cls, "experts")
        if experts_class is None:
            raise R.Unsupported("experts built by a helper or a conditional, not by a class tpmoe can read")
        impl = _experts_impl(experts_class, _decorator_flags_of_class(experts_class))
        if impl.gate == "apply_gate":
            gate = _gate_impl(experts_class)
            if gate.split != ("concatenated" if impl.concatenated else "interleaved"):
                raise R.Unsupported(f"experts {experts_class.__name__}: _apply_gate splits {gate.split} columns")
        return impl

    @staticmethod
    def experts_impl(experts: R.ExpertsImpl) -> R.ExpertsImpl:
        return experts

    @staticmethod
    def has_router(attribute: str) -> bool:
        return True  # judge_class has seen the class assign a gate or a router

    def shared(self, block: R.BlockImpl, experts: R.ExpertsImpl) -> Tuple[None, str]:
        if block.shared is None:
            return None, ""
        shared_class = assigned_class(self.cls, block.shared)
        if shared_class is None or forward_code(shared_class) not in _codes("shared"):
            return None, f"its {block.shared} matches no verified shared-expert MLP"
        return None, ""

    def router(self, attribute: str) -> Optional[R.RouterImpl]:
        router_class = assigned_class(self.cls, attribute)
        return _codes("routers").get(forward_code(router_class)) if router_class is not None else None


def plan_for(module: nn.Module, name: str = "") -> Plan:
    """The Plan for an MoE block instance; raises UnsupportedFamilyError naming family, class and reason."""
    try:
        verdict = _decide(_InstanceView(module))
    except R.Unsupported as error:
        raise unsupported(module, name, str(error)) from None
    return Plan(verdict.mode, verdict.experts, block=verdict.block, router=verdict.router, shared=verdict.shared,
                note=verdict.note)


# --------------------------------------------------------------------------- classes (the scan)


def judge_class(cls: type) -> Optional[Tuple[bool, str]]:
    """(supported, description or reason) for an MoE block class, or None if cls is no MoE block.

    The class-level reading of plan_for's decision (`_decide` over a `_ClassView`), for
    `python -m tpmoe.hf.families`: an MoE block is a class whose __init__ assigns self.experts and
    self.gate or self.router. What only an instance shows (the configured activation, a limit of
    None) is left to plan_for."""
    own = _own_experts_block(cls)
    if own is not None:
        return True, f"block {own.name}, its own router"
    if not assigns(cls, "experts") or not (assigns(cls, "gate") or assigns(cls, "router")):
        return None
    try:
        verdict = _decide(_ClassView(cls))
    except _WeightedInputs:
        return False, _WEIGHTED_INPUTS  # the scan's reasons are one line each: no note on the shared expert
    except R.Unsupported as error:
        return False, str(error)
    if verdict.mode == "experts":
        return True, "experts"
    router = verdict.router
    return True, f"block {verdict.block.name}, " + (f"native {router.name} router" if router else "its own router")


def scan_installed_families(progress: Optional[Callable[[int, int, str], None]] = None
                            ) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Imports every transformers.models.*.modeling_* module and judges each MoE block class in it.

    Returns ({"family.Class": how it runs}, {"family.Class": why not}). Slow (imports ~400
    modules): for the snapshot, not for `apply`, which judges the instances it meets.
    progress(done, total, family) is called before each family is imported."""
    import importlib
    import pkgutil

    import transformers.models as models

    supported, rejected = {}, {}
    families = list(pkgutil.iter_modules(models.__path__))
    for done, info in enumerate(families):
        family = info.name
        if progress is not None:
            progress(done, len(families), family)
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue  # no modeling file, or it needs an optional dependency
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, nn.Module):
                continue
            verdict = judge_class(cls)
            if verdict is not None:
                (supported if verdict[0] else rejected)[f"{family}.{cls.__name__}"] = verdict[1]
    return supported, rejected
