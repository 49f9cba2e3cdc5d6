"""Where a run's wall time goes: named sections, printed as a table at the end of a run.

  with timing.TIMINGS.section('report'):
    write_report()
  print(timing.TIMINGS.table())

The sections are wall-clock time on the host. A section that ends with device work still in
flight is charged to whatever waits for it next: a phase's first step is made to finish
(`block_until_ready`) so that its compile time is charged to it.
"""

from collections.abc import Iterator
import contextlib
import time


class Timings:
  """Seconds per named section since `start`; what no section covers is reported as other."""

  def __init__(self, start: float | None = None):
    self.start = time.perf_counter() if start is None else start
    self.seconds: dict[str, float] = {}

  def reset(self, start: float | None = None) -> None:
    self.__init__(start)

  def add(self, name: str, seconds: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds

  @contextlib.contextmanager
  def section(self, name: str) -> Iterator[None]:
    begin = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - begin)

  def as_dict(self) -> dict[str, float]:
    """Every section, then 'other' and 'total' (seconds since `start`)."""
    total = time.perf_counter() - self.start
    out = dict(self.seconds)
    out['other'] = max(total - sum(self.seconds.values()), 0.0)
    out['total'] = total
    return out

  def table(self) -> str:
    rows = self.as_dict()
    total = rows['total']
    width = max(len(k) for k in rows)
    lines = [f'{"section":<{width}}  {"seconds":>8}  {"share":>6}']
    for name, seconds in rows.items():
      share = seconds / total if total > 0 else 0.0
      lines.append(f'{name:<{width}}  {seconds:>8.2f}  {share:>6.1%}')
    return '\n'.join(lines)


TIMINGS = Timings()  # The process's run; `train.main` starts it before its imports.
