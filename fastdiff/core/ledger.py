"""What actually happened, as opposed to what the plan said would.

Tests assert on it (exact decision counts), benchmarks print it (FLOPs and time saved).
FLOPs are only known when counting was asked for, because counting slows every operator.

"Saved" has one meaning everywhere: the FLOPs the unmodified denoiser would have run for the
denoiser calls the pipeline made, minus the FLOPs the denoiser actually ran. Methods move work
in ways no per-module tally sees (T-GATE halves the batch at the denoiser boundary; encoder
propagation computes later steps' decoders inside an earlier step's call), so the vanilla side
is measured, not reconstructed from what hooked modules avoided.

Under patch parallelism the ledger is per process: vanilla is the full image's cost, run is this
process's share of it. Splitting a call across N processes saves nothing (the processes run it
together), so there "saved" is vanilla minus N times this process's share, and reports say
"split across N processes" with the share instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .plan import Decision


@dataclass
class ModuleEvent:
    """One hooked module call."""

    call: int
    step: int
    module: str
    method: str
    decision: Decision
    seconds: float
    flops: int | None = None
    flops_saved: int | None = None


@dataclass
class StepEvent:
    """One denoising step: every denoiser call made during it, summed."""

    call: int
    step: int
    timestep: float | None
    seconds: float = 0.0
    denoiser_calls: int = 0
    flops: int | None = None
    # what the unmodified denoiser would have run for the calls the pipeline made in this step
    flops_vanilla: int | None = None
    answered: int = 0  # calls the pipeline made that were answered without running the denoiser


@dataclass
class CommEvent:
    """Bytes moved between processes in one step, for one kind of layer (``conv``, ``groupnorm``,
    ``attention``, ``output``; ``wait`` carries only the time spent waiting on an earlier exchange)."""

    call: int
    step: int
    kind: str
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


@dataclass
class Ledger:
    """Events of the most recent ``max_calls`` pipeline calls (older ones are dropped, so a
    long-running service does not grow without bound)."""

    modules: list[ModuleEvent] = field(default_factory=list)
    steps: list[StepEvent] = field(default_factory=list)
    max_calls: int = 64
    cache_bytes: dict[int, int] = field(default_factory=dict)  # call -> peak bytes kept for reuse
    comm: list[CommEvent] = field(default_factory=list)
    processes: int = 1  # how many processes split each denoiser call (patch parallelism sets it)

    def record_comm(self, call: int, step: int, kind: str, sent: int, received: int, seconds: float) -> None:
        for event in reversed(self.comm):
            if event.call != call or event.step != step:
                break
            if event.kind == kind:
                event.bytes_sent += sent
                event.bytes_received += received
                event.seconds += seconds
                return
        self.comm.append(CommEvent(call, step, kind, sent, received, seconds))

    def note_cache_bytes(self, call: int, held: int) -> None:
        if held > self.cache_bytes.get(call, 0):
            self.cache_bytes[call] = held

    def clear(self) -> None:
        self.modules.clear()
        self.steps.clear()
        self.cache_bytes.clear()
        self.comm.clear()

    def start_call(self, call: int) -> None:
        """Make room for ``call``: keep only the calls after ``call - max_calls``."""
        oldest = call - self.max_calls + 1
        if (self.steps and self.steps[0].call < oldest) or (self.modules and self.modules[0].call < oldest):
            self.steps[:] = [s for s in self.steps if s.call >= oldest]
            self.modules[:] = [m for m in self.modules if m.call >= oldest]
            self.comm[:] = [c for c in self.comm if c.call >= oldest]
            self.cache_bytes = {c: b for c, b in self.cache_bytes.items() if c >= oldest}

    def record_step(self, call: int, step: int, timestep: float | None, seconds: float, flops: int | None,
                    denoiser_calls: int = 1, flops_vanilla: int | None = None, answered: int = 0) -> None:
        """One denoiser call of ``step`` (or ``denoiser_calls=0``: a step whose output was reused
        whole; ``answered=1``: a call the pipeline made that a method answered without running)."""
        last = self.steps[-1] if self.steps else None
        if last is not None and last.call == call and last.step == step:
            last.seconds += seconds
            last.denoiser_calls += denoiser_calls
            last.answered += answered
            if flops is not None:
                last.flops = (last.flops or 0) + flops
            if flops_vanilla is not None:
                last.flops_vanilla = (last.flops_vanilla or 0) + flops_vanilla
            return
        self.steps.append(StepEvent(call, step, timestep, seconds, denoiser_calls, flops, flops_vanilla, answered))

    @property
    def calls(self) -> list[int]:
        return sorted({s.call for s in self.steps} | {m.call for m in self.modules})

    def report(self, call: int | None = -1) -> Report:
        """Summary of one pipeline call (default: the last), or of all calls with ``call=None``."""
        calls = self.calls
        if call is not None and calls:
            chosen = {calls[call]} if call < 0 else {call}
        else:
            chosen = set(calls)
        steps = [s for s in self.steps if s.call in chosen]
        events = [m for m in self.modules if m.call in chosen]
        per_module: dict[str, ModuleStats] = {}
        for event in events:
            stats = per_module.setdefault(event.module, ModuleStats(event.module, event.method))
            stats.add(event)
        comm = [c for c in self.comm if c.call in chosen]
        sent_by_step: dict[tuple[int, int], int] = defaultdict(int)
        by_kind: dict[str, CommEvent] = {}
        for c in comm:
            sent_by_step[(c.call, c.step)] += c.bytes_sent
            total = by_kind.setdefault(c.kind, CommEvent(-1, -1, c.kind))
            total.bytes_sent += c.bytes_sent
            total.bytes_received += c.bytes_received
            total.seconds += c.seconds
        counted = bool(steps) and all(s.flops is not None for s in steps)
        measured = counted and all(s.flops_vanilla is not None for s in steps)
        return Report(
            calls=len(chosen),
            steps=[
                StepSummary(s.call, s.step, s.timestep, s.seconds, s.denoiser_calls, s.flops,
                            s.flops_vanilla if measured else None, sent_by_step.get((s.call, s.step), 0),
                            s.answered, self.processes)
                for s in steps
            ],
            modules=list(per_module.values()),
            denoiser_seconds=sum(s.seconds for s in steps),
            flops_run=sum(s.flops or 0 for s in steps) if counted else None,
            flops_vanilla=sum(s.flops_vanilla or 0 for s in steps) if measured else None,
            peak_cache_bytes=max((self.cache_bytes.get(c, 0) for c in chosen), default=0),
            comm_by_kind=by_kind,
            processes=self.processes,
        )


@dataclass
class ModuleStats:
    """One hooked module's decisions. ``flops_saved`` attributes savings to the module (its own
    cost where it was reused or skipped); savings made at the denoiser boundary belong to no
    module, so these need not add up to :attr:`Report.flops_saved`."""

    module: str
    method: str
    computed: int = 0
    reused: int = 0
    skipped: int = 0
    seconds: float = 0.0
    flops_saved: int = 0

    def add(self, event: ModuleEvent) -> None:
        if event.decision is Decision.COMPUTE:
            self.computed += 1
        elif event.decision is Decision.REUSE:
            self.reused += 1
        else:
            self.skipped += 1
        self.seconds += event.seconds
        self.flops_saved += event.flops_saved or 0


@dataclass
class StepSummary:
    call: int
    step: int
    timestep: float | None
    seconds: float
    denoiser_calls: int
    flops_run: int | None
    flops_vanilla: int | None
    bytes_sent: int = 0
    answered: int = 0  # calls the pipeline made that a method answered without running the denoiser
    processes: int = 1  # processes that split the step's denoiser calls (patch parallelism)

    @property
    def flops_saved(self) -> int | None:
        """Vanilla minus run for this step (under a split, minus all processes' run, taken as
        ``processes`` times this one's); negative where the step computed later steps' work
        (batched decoders), which those steps then show as saved, or where the split costs more
        than it divides."""
        if self.flops_run is None or self.flops_vanilla is None:
            return None
        return self.flops_vanilla - self.flops_run * self.processes


def _flops(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return str(value)


@dataclass
class Report:
    """Per-call totals plus per-step and per-module breakdowns; ``print`` gives a table.

    ``flops_vanilla`` is what the unmodified denoiser would have run for the denoiser calls the
    pipeline made (measured once per input shape by a shadow pass, see ``Accelerator``),
    ``flops_run`` what it ran; saved and the ideal speedup derive from these two alone. Under
    patch parallelism the report is one process's: vanilla is what one device would run for the
    whole image (and both guidance halves), run is this process's share, so the ratio is the
    ideal speedup of the parallel run over a single device.
    """

    calls: int
    steps: list[StepSummary]
    modules: list[ModuleStats]
    denoiser_seconds: float
    flops_run: int | None
    flops_vanilla: int | None = None
    peak_cache_bytes: int = 0
    comm_by_kind: dict[str, CommEvent] = field(default_factory=dict)
    processes: int = 1
    """How many processes split each denoiser call (patch parallelism); 1 on one device."""

    @property
    def flops_saved(self) -> int | None:
        """Vanilla's denoiser FLOPs for the same call minus the FLOPs run. Under a split across
        N processes the run is all of theirs (N times this process's share, which is what a
        process can see), so dividing the work among processes never counts as saving it: what
        remains is what reuse methods saved, less what the split itself adds."""
        if self.flops_run is None or self.flops_vanilla is None:
            return None
        return self.flops_vanilla - self.flops_run * self.processes

    @property
    def flops_share(self) -> float | None:
        """This process's share of vanilla's work (1.0 on one device without reuse)."""
        if self.flops_run is None or not self.flops_vanilla:
            return None
        return self.flops_run / self.flops_vanilla

    @property
    def reuses(self) -> bool:
        """Whether a method reused, skipped or answered anything (what can save FLOPs)."""
        return bool(self.modules) or any(s.answered for s in self.steps)

    @property
    def bytes_sent(self) -> int:
        """Bytes this process sent to the others (patch parallelism), all steps."""
        return sum(c.bytes_sent for c in self.comm_by_kind.values())

    @property
    def bytes_received(self) -> int:
        return sum(c.bytes_received for c in self.comm_by_kind.values())

    @property
    def comm_seconds(self) -> float:
        """Time spent in exchanges and waiting for them."""
        return sum(c.seconds for c in self.comm_by_kind.values())

    @property
    def denoiser_calls(self) -> int:
        """Calls of the whole denoiser (NFE); a batched guidance pair counts once."""
        return sum(s.denoiser_calls for s in self.steps)

    @property
    def module_calls(self) -> int:
        return sum(m.computed + m.reused + m.skipped for m in self.modules)

    @property
    def module_calls_avoided(self) -> int:
        return sum(m.reused + m.skipped for m in self.modules)

    @property
    def flop_ratio(self) -> float | None:
        """Vanilla FLOPs over FLOPs actually run: the speedup a perfect engine would reach."""
        if not self.flops_run or self.flops_vanilla is None:
            return None
        return self.flops_vanilla / self.flops_run

    def summary(self) -> str:
        answered = sum(s.answered for s in self.steps)
        parts = [f"{len(self.steps)} steps, {self.denoiser_calls} denoiser calls"
                 + (f" ({answered} more answered without running it)" if answered else "")]
        if self.modules:
            parts.append(f"{self.module_calls_avoided}/{self.module_calls} hooked module calls reused or skipped")
        if self.flops_run is not None and self.flops_vanilla is not None and self.processes > 1:
            share = f"{self.flops_share:.0%}" if self.flops_share is not None else "n/a"
            ratio = f"{self.flop_ratio:.2f}x" if self.flop_ratio is not None else "n/a"
            part = (f"denoiser FLOPs split across {self.processes} processes: this one ran "
                    f"{_flops(self.flops_run)}, {share} of the {_flops(self.flops_vanilla)} of one vanilla process "
                    f"(ideal speedup {ratio})")
            if self.reuses:
                part += f", reuse saved {_flops(self.flops_saved)} (vanilla minus {self.processes} x this share)"
            parts.append(part)
        elif self.flops_run is not None and self.flops_vanilla is not None:
            saved = self.flops_vanilla - self.flops_run
            share = f"{saved / self.flops_vanilla:.0%}" if self.flops_vanilla else "n/a"
            ratio = f"{self.flop_ratio:.2f}x" if self.flop_ratio is not None else "n/a"
            parts.append(
                f"denoiser FLOPs {_flops(self.flops_run)} run of {_flops(self.flops_vanilla)} vanilla, "
                f"{_flops(saved)} saved ({share}; ideal speedup {ratio})"
            )
        elif self.flops_run is not None:
            parts.append(f"denoiser FLOPs {_flops(self.flops_run)} run")
        if self.peak_cache_bytes:
            parts.append(f"cache {self.peak_cache_bytes / 2**20:.1f} MiB")
        if self.comm_by_kind:
            per_step = self.bytes_sent / max(len(self.steps), 1)
            parts.append(f"sent {self.bytes_sent / 2**20:.2f} MiB ({per_step / 2**20:.3f} MiB/step), "
                         f"communication {self.comm_seconds:.2f} s")
        parts.append(f"denoiser time {self.denoiser_seconds:.2f} s")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"fastdiff report ({self.calls} call{'s' if self.calls != 1 else ''}): {self.summary()}"]
        if self.steps:
            lines.append(f"{'step':>5} {'timestep':>9} {'calls':>5} {'seconds':>8} {'FLOPs run':>11} "
                         f"{'vanilla':>11} {'saved':>11}")
            for s in self.steps:
                ts = "" if s.timestep is None else f"{s.timestep:.1f}"
                lines.append(
                    f"{s.step:>5} {ts:>9} {s.denoiser_calls:>5} {s.seconds:>8.3f} "
                    f"{_flops(s.flops_run):>11} {_flops(s.flops_vanilla):>11} {_flops(s.flops_saved):>11}"
                )
            if self.processes > 1:
                lines.append(f"(split across {self.processes} processes: FLOPs run are this process's share; saved is "
                             f"vanilla minus {self.processes} times it, so the split itself saves nothing)")
        if self.modules:
            width = max(len(m.module) for m in self.modules)
            lines.append(f"{'module':<{width}} {'method':<10} {'compute':>7} {'reuse':>6} {'skip':>5} {'FLOPs saved':>12}")
            for m in self.modules:
                lines.append(
                    f"{m.module:<{width}} {m.method:<10} {m.computed:>7} {m.reused:>6} {m.skipped:>5} "
                    f"{_flops(m.flops_saved if self.flops_run is not None else None):>12}"
                )
            if self.flops_run is not None:
                lines.append("(a module's FLOPs saved are its own cost where it was reused or skipped; savings at the "
                             "denoiser boundary, such as dropped guidance or batched calls, belong to no module, so "
                             "the column need not add up to the total saved)")
        return "\n".join(lines)
