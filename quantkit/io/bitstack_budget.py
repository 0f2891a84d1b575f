"""Memory budget -> BitStack blocks per layer, from an artifact's header alone.

Memory accounting ("every byte the loaded model holds"): the sum of ``numel * element_size``
over the loaded model's parameters and buffers, each storage counted once (tied embedding
and head count once), including non-persistent buffers such as rotary ``inv_freq``.
Activations, the KV cache, Python objects and allocator slack are not counted. For a
BitStack layer that is its loaded blocks (signs + u, v [+ scale]: ``block_bytes`` each) plus
its bias; every other tensor (embeddings, norms, head, any non-BitStack layer) is counted
at its stored size.

Budget -> blocks (as the reference, algorithms.md §2.7): every BitStack layer holds at
least one block; the minimum is those first blocks plus everything else. Then the
model-wide order (stored per module as ``spec["order"]``: the position of its block i,
i >= 1) is walked, adding one block per step while the total stays within the budget.
The first block that does not fit ends the walk (a prefix of the order, so every budget
gives a model on the same path, and the result is within one block of the request).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from quantkit.errors import FormatError, UsageError

FORMAT = "bitstack"
# tensors of a BitStack module, [n_blocks, ...] each ("weight.scale" only with int8 factors)
PACKED_KEYS = ("weight", "weight.u", "weight.v", "weight.scale")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(value: Union[int, str]) -> int:
    """Bytes from an int or a string with an optional unit.

    Units are SI (KB = 1000, MB = 10^6, GB = 10^9 bytes), binary ones explicit (KiB, MiB,
    GiB = 2^10, 2^20, 2^30); case-insensitive; decimals allowed ("1.5GB"). Raises UsageError.
    """
    if isinstance(value, bool):
        raise UsageError(f"memory_budget must be bytes (int) or a size string such as '120MB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise UsageError(f"memory_budget must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(value))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"memory budget {value!r} is not a size; give bytes or a number with a unit: "
                         "KB, MB, GB (SI, powers of 1000) or KiB, MiB, GiB (powers of 1024), e.g. 120MB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"memory budget {value!r} must be positive")
    return size


@dataclass(frozen=True)
class BudgetPlan:
    """What any budget can buy for one artifact."""

    fixed_bytes: int              # everything but the BitStack blocks (plus non-persistent buffers)
    minimum: int                  # fixed + one block per BitStack layer
    steps: tuple                  # ((module, block count after the step, bytes after the step), ...) in order
    block_bytes: dict             # module -> bytes per block
    n_blocks: dict                # module -> blocks stored

    @property
    def maximum(self) -> int:
        return self.steps[-1][2] if self.steps else self.minimum

    def choose(self, budget: int) -> tuple[dict, int]:
        """({module: blocks to load}, bytes the loaded model will hold) for ``budget`` bytes."""
        if budget < self.minimum:
            raise UsageError(f"memory budget {budget:,} bytes ({budget / 1e6:.2f} MB) is below this artifact's "
                             f"minimum of {self.minimum:,} bytes ({self.minimum / 1e6:.2f} MB: one BitStack block "
                             f"per layer plus {self.fixed_bytes / 1e6:.2f} MB of other weights)")
        blocks = {name: 1 for name in self.block_bytes}
        total = self.minimum
        for name, count, after in self.steps:
            if after > budget:
                break
            blocks[name], total = count, after
        return blocks, total


def bitstack_modules(info: dict) -> dict:
    """{name: spec} of the BitStack modules in an artifact's metadata."""
    return {n: s for n, s in info["modules"].items() if s.get("format") == FORMAT}


def make_plan(info: dict, fixed: int) -> BudgetPlan:
    """The plan for the artifact described by ``artifact.read_metadata``'s ``info``.

    fixed: bytes the loaded model holds outside its BitStack blocks (``artifact.fixed_bytes``).
    """
    mods = bitstack_modules(info)
    block_bytes, n_blocks, entries = {}, {}, []
    for name, spec in mods.items():
        try:
            bb, nb = int(spec["block_bytes"]), int(spec["n_blocks"])
            order = spec.get("order")
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{info['path']}: BitStack module {name} has no block_bytes/n_blocks") from None
        block_bytes[name], n_blocks[name] = bb, nb
        if nb > 1:
            if not (isinstance(order, list) and len(order) == nb - 1 and all(isinstance(p, int) for p in order)):
                raise FormatError(f"{info['path']}: BitStack module {name} has {nb} blocks but no valid order "
                                  f"(expected {nb - 1} integer positions)")
            if any(b <= a for a, b in zip(order, order[1:])):
                raise FormatError(f"{info['path']}: BitStack module {name}: block order positions must increase "
                                  f"with the block index, got {order}")
            entries += [(pos, name, i + 2) for i, pos in enumerate(order)]
    entries.sort()
    if len({p for p, _, _ in entries}) != len(entries):
        raise FormatError(f"{info['path']}: two BitStack blocks share one position in the block order")
    minimum = fixed + sum(block_bytes.values())
    steps, total = [], minimum
    for _, name, count in entries:
        total += block_bytes[name]
        steps.append((name, count, total))
    return BudgetPlan(fixed, minimum, tuple(steps), block_bytes, n_blocks)


def budget_summary(plan: BudgetPlan) -> dict:
    """minimum / maximum / step sizes for ``quantkit inspect``."""
    sizes = sorted(set(plan.block_bytes.values()))
    return {"minimum_bytes": plan.minimum, "maximum_bytes": plan.maximum, "n_steps": len(plan.steps),
            "step_bytes_min": sizes[0] if sizes else 0, "step_bytes_max": sizes[-1] if sizes else 0,
            "fixed_bytes": plan.fixed_bytes}


def model_memory_bytes(model) -> int:
    """Bytes held by ``model``'s parameters and buffers, each storage once (see the module doc)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
