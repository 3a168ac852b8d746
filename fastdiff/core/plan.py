"""The reuse plan: for every claimed module and every denoising step, what to do.

Every single-device method reduces to this table, so one hook can execute any of them and a
user can read (and edit) exactly what will be reused before running anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path


class Decision(str, Enum):
    """What a hooked module does at one step."""

    COMPUTE = "compute"
    REUSE = "reuse"
    SKIP = "skip"

    @property
    def symbol(self) -> str:
        return _SYMBOLS[self]


_SYMBOLS = {Decision.COMPUTE: "#", Decision.REUSE: ".", Decision.SKIP: "-"}


@dataclass
class Plan:
    """Module path × step → Decision, for one step count.

    Steps beyond ``num_steps`` (a pipeline that runs more iterations than announced) compute,
    so a plan can never make a call reuse something it did not foresee.
    """

    num_steps: int
    rows: dict[str, tuple[Decision, ...]] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for module, row in self.rows.items():
            if len(row) != self.num_steps:
                raise ValueError(
                    f"plan row for {module!r} has {len(row)} steps, expected num_steps={self.num_steps}"
                )

    def decision(self, module: str, step: int) -> Decision:
        row = self.rows.get(module)
        if row is None or step >= len(row):
            return Decision.COMPUTE
        return row[step]

    @property
    def modules(self) -> list[str]:
        return list(self.rows)

    def reuses(self, module: str) -> bool:
        """Whether the module ever needs its previous output kept."""
        return Decision.REUSE in self.rows.get(module, ())

    def count(self, decision: Decision) -> int:
        return sum(row.count(decision) for row in self.rows.values())

    def full_steps(self) -> list[int]:
        """Steps at which every claimed module computes."""
        return [
            s for s in range(self.num_steps) if all(row[s] is Decision.COMPUTE for row in self.rows.values())
        ]

    @classmethod
    def merge(cls, num_steps: int, parts: Iterable[tuple[str, Mapping[str, Sequence[Decision]]]]) -> Plan:
        """Combine per-method rows; two methods claiming one module is an error, not a silent override."""
        rows: dict[str, tuple[Decision, ...]] = {}
        owners: dict[str, str] = {}
        for owner, part in parts:
            for module, row in part.items():
                if module in owners:
                    raise ValueError(
                        f"methods {owners[module]!r} and {owner!r} both claim module {module!r}; "
                        "combine methods that act on different modules"
                    )
                rows[module] = tuple(Decision(d) for d in row)
                owners[module] = owner
        return cls(num_steps=num_steps, rows=rows, owners=owners)

    # -- text and files -------------------------------------------------------------------
    def __str__(self) -> str:
        if not self.rows:
            return f"Plan({self.num_steps} steps): every module computes at every step"
        width = max(len(f"{m} [{self.owners.get(m, '')}]") for m in self.rows)
        ticks = "".join(str(s // 10 % 10) if s % 10 == 0 else " " for s in range(self.num_steps))
        units = "".join(str(s % 10) for s in range(self.num_steps))
        lines = [
            f"Plan: {len(self.rows)} modules x {self.num_steps} steps   "
            f"(# compute, . reuse, - skip; full steps: {self.full_steps()})",
            f"{'step':>{width}} {ticks}",
            f"{'':>{width}} {units}",
        ]
        for module, row in self.rows.items():
            label = f"{module} [{self.owners.get(module, '')}]"
            lines.append(f"{label:<{width}} " + "".join(d.symbol for d in row))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "rows": {m: "".join(d.symbol for d in row) for m, row in self.rows.items()},
            "owners": dict(self.owners),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        by_symbol = {d.symbol: d for d in Decision}
        try:
            rows = {m: tuple(by_symbol[c] for c in text) for m, text in data["rows"].items()}
        except KeyError as exc:
            raise ValueError(f"plan rows may only contain {sorted(by_symbol)}: unknown {exc}") from None
        return cls(num_steps=int(data["num_steps"]), rows=rows, owners=dict(data.get("owners", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(json.loads(Path(path).read_text()))
