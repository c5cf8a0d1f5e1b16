"""Deferred construction and layout-free initialisation.

Construction allocates no parameter memory: inside ``deferred_init()`` every parameter a module creates
lives on the meta device (shape, dtype and attributes only), while buffers (rotary frequencies, usage
statistics, the MoE selection bias) are built for real: they are small and some are computed, not drawn.
This is accelerate's ``init_empty_weights(include_buffers=False)`` and what torchtitan does with
``torch.device("meta")``; a rank then materialises only its own pieces (``sparselm.parallel.materialize``).

Initial values must not depend on which rank draws them or in which order, so each module is initialised
from its own random stream: ``torch.manual_seed(module_seed(train.seed, canonical module name))``, then
``init_module``.  The one-process model and every piece of every layout therefore hold the same numbers,
and a rank can initialise any one module (transiently, at full size) without initialising the others.
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _EmptyOnMeta(TorchFunctionMode):
    """``torch.empty`` without a device allocates on the meta device: how every parameter here (and in
    torch's and megatron-core's layers) is created, while buffers come from zeros/full/arange and stay real."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def deferred_init():
    """Parameters created inside live on the meta device (buffers do not): ``torch.empty`` without a device
    goes to meta, and any other parameter is moved there when registered.  Not thread-safe: it patches
    ``nn.Module.register_parameter`` for the duration."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        with _EmptyOnMeta():
            yield
    finally:
        nn.Module.register_parameter = register


def module_seed(seed: int, module_name: str) -> int:
    """The random seed of the module named ``module_name`` (its canonical name in the one-process model)."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_module(module: nn.Module, mcfg) -> None:
    """Initialise ``module``'s own parameters (not its children's): Normal(0, init_std) for linear and embedding
    weights, output projections (``is_output_proj``) at init_std / sqrt(2 n_layers) (GPT-2), biases zero;
    any other module through its ``reset_parameters`` (norms, experts, routers, PKM tables, memory)."""
    std = mcfg.init_std
    if isinstance(module, (nn.Linear, nn.Embedding)):
        out_std = std / math.sqrt(2 * mcfg.n_layers)
        nn.init.normal_(module.weight, 0.0, out_std if getattr(module, "is_output_proj", False) else std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()


def owned_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> names of the parameters it owns: the first module (in ``named_modules`` order) that
    holds a tensor owns it, so a tied or shared tensor is initialised once, by its first holder."""
    seen, owned = set(), {}
    for name, module in model.named_modules():
        mine = [attr for attr, p in module._parameters.items() if p is not None and id(p) not in seen]
        seen.update(id(module._parameters[attr]) for attr in mine)
        if mine:
            owned[name] = mine
    return owned


def initial_values(module: nn.Module, module_name: str, mcfg, seed: int, rows: tuple[int, int] | None = None
                   ) -> dict[str, torch.Tensor]:
    """The initial values (CPU) of the parameters ``module`` holds directly, drawn from the module's own
    stream: full size, or with ``rows=(first, count)`` only those rows along dim 0 of a module drawn row by
    row (``init_by_rows``, e.g. experts; its ``first_expert`` is set while it draws).  Meta parameters are
    replaced by real ones while ``init_module`` runs and put back afterwards, so ``module`` stays on the
    meta device and the result is the only memory used."""
    saved = dict(module._parameters)
    first = getattr(module, "first_expert", None)

    def shape(p):
        return p.shape if rows is None else (rows[1], *p.shape[1:])

    real = {attr: nn.Parameter(torch.empty(shape(p), dtype=p.dtype), requires_grad=p.requires_grad)
            for attr, p in saved.items() if p is not None}
    module._parameters.update(real)
    if rows is not None:
        module.first_expert = rows[0]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(seed, module_name))
            init_module(module, mcfg)
    finally:
        module._parameters.update(saved)
        if rows is not None:
            module.first_expert = first
    return {attr: p.detach() for attr, p in real.items()}


class InitSource:
    """Canonical tensors at their initial values, drawn one module at a time from ``reference`` (the
    one-process model on the meta device); only the module last asked for is held."""

    def __init__(self, reference: nn.Module, cfg, seed: int | None = None):
        self.reference, self.mcfg = reference, cfg.model
        self.seed = cfg.train.seed if seed is None else seed
        self.owner: dict[str, tuple[str, str]] = {}
        """Canonical name (any alias of a tied tensor) -> (owning module, attribute)."""
        first: dict[int, tuple[str, str]] = {}
        for module_name, module in reference.named_modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    self.owner[_join(module_name, attr)] = first.setdefault(id(p), (module_name, attr))
        self._cached: tuple = (None, {})

    def __contains__(self, name: str) -> bool:
        return name in self.owner

    def full(self, name: str) -> torch.Tensor:
        return self._values(name, None)

    def rows(self, name: str, first: int, count: int) -> torch.Tensor | None:
        """Rows [first, first + count) along dim 0 of the canonical tensor, drawn alone when its module is
        drawn row by row (``init_by_rows``); None otherwise (the caller takes them from ``full``)."""
        module_name, _ = self.owner[name]
        if not getattr(self.reference.get_submodule(module_name), "init_by_rows", False):
            return None
        return self._values(name, (first, count))

    def _values(self, name: str, rows) -> torch.Tensor:
        module_name, attr = self.owner[name]
        key = (module_name, rows)
        if self._cached[0] != key:
            self._cached = (None, {})  # free the previous module's tensors before drawing the next
            module = self.reference.get_submodule(module_name)
            self._cached = (key, initial_values(module, module_name, self.mcfg, self.seed, rows))
        return self._cached[1][attr]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def meta_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]]:
    """Every meta parameter of ``model`` once: (its first name, it, every (module, attribute) holding it)."""
    found: dict[int, tuple[str, nn.Parameter, list]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and p.is_meta:
                found.setdefault(id(p), (_join(module_name, attr), p, []))[2].append((module, attr))
    return list(found.values())


@torch.no_grad()
def materialize(model: nn.Module, source, canonical=None, take=None, after=None) -> nn.Module:
    """Give every meta parameter of ``model`` real memory holding its value from ``source`` (``full(name)``:
    the canonical tensor, e.g. ``InitSource`` or a checkpoint).  ``canonical(local name) -> canonical name``
    (identity by default); ``take(source, canonical name, param) -> this rank's piece`` (default
    ``source.full``: a one-process model).  Parameters keep their identity across holders (tied and shared tensors stay one Parameter)
    and their attributes.  Raises ValueError naming the parameter when the source has no such tensor or
    the piece does not have the parameter's shape (a parallel rule that does not describe its piece).
    ``after(param)`` is called on each parameter as soon as it holds its value (ZeRO-3 partitions it there)."""
    canonical = canonical or (lambda name: name)
    for name, meta, holders in meta_parameters(model):
        canon = canonical(name)
        if canon not in source:
            raise ValueError(f"cannot materialise parameter '{name}' (canonical name '{canon}'): the one-process "
                             f"model has no such tensor; a parallel rule renamed or added it")
        local = source.full(canon) if take is None else take(source, canon, meta)
        if tuple(local.shape) != tuple(meta.shape):
            raise ValueError(f"cannot materialise parameter '{name}' (canonical '{canon}'): its piece of the "
                             f"canonical tensor has shape {tuple(local.shape)}, the parameter "
                             f"{tuple(meta.shape)}; the parallel rule of its module describes its piece wrongly")
        local = local.to(meta.dtype)
        if not _owns_its_storage(local):  # a view into a full tensor: copy, so the full one can be freed
            local = local.clone(memory_format=torch.contiguous_format)
        real = nn.Parameter(local, requires_grad=meta.requires_grad)
        real.__dict__.update(meta.__dict__)
        for module, attr in holders:
            module._parameters[attr] = real
        if after is not None:
            after(real)
    return model


def _owns_its_storage(t: torch.Tensor) -> bool:
    return (t._base is None and t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def check_materialized(model: nn.Module, what: str = "the model") -> None:
    """Raise naming every parameter or buffer still on the meta device (a rule left it unmaterialised)."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{what} still has {len(left)} tensor(s) on the meta device, never materialised: "
                         f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
