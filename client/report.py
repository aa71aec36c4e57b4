"""What a run tells its user: a progress bar, ``--json`` lines, and a closing summary.

    reporter = Reporter(json_lines=True, progress=sys.stdout.isatty())
    reporter.outcome(outcome)      # for each finished input, as it finishes
    reporter.close(elapsed)        # the summary and the failures, on stderr

The bar (tqdm, on stderr) shows done/failed counts, images per second and, once the
inputs have been counted (:meth:`Reporter.set_total`), an ETA. ``--json`` prints one
line per finished input on stdout, flushed at once, for pipelines. Failures are listed
at the end with their errors: the first :data:`MAX_LISTED` of them (memory stays flat
however many fail; the JSON lines name every one).
"""

from __future__ import annotations

import sys
from typing import TextIO

import orjson

from .stream import Outcome

__all__ = ["MAX_LISTED", "Reporter"]

MAX_LISTED = 1000


class Reporter:
    def __init__(
        self,
        *,
        json_lines: bool = False,
        progress: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.json_lines = json_lines
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.ok = self.skipped = self.failed = 0
        self.failures: list[Outcome] = []
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="img", file=self.err, dynamic_ncols=True, smoothing=0.05)

    def set_total(self, total: int) -> None:
        """The number of inputs, once counted: the bar gains a percentage and an ETA."""
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def outcome(self, outcome: Outcome) -> None:
        if outcome.status == "ok":
            self.ok += 1
        elif outcome.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            if len(self.failures) < MAX_LISTED:
                self.failures.append(outcome)
        if self.json_lines:
            self._print(orjson.dumps(outcome.to_json()).decode())
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"ok {self.ok}, skipped {self.skipped}, failed {self.failed}", refresh=False
            )
            self._bar.update(1)

    def message(self, text: str) -> None:
        """A line on stderr that does not tear the bar."""
        self._print(text, self.err)

    def close(self, elapsed: float, *, interrupted: bool = False, fatal: str | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        rate = self.ok / elapsed if elapsed > 0 else 0.0
        summary = (
            f"latent-upscaler: {self.ok} upscaled, {self.skipped} skipped, {self.failed} failed "
            f"in {elapsed:.1f} s ({rate:.1f} images/s)"
        )
        if interrupted:
            summary += "; interrupted: inputs not started were left for a rerun"
        print(summary, file=self.err)
        if fatal:
            print(f"latent-upscaler: stopped early: {fatal}", file=self.err)
        if self.failures:
            print("failed:", file=self.err)
            for failure in self.failures:
                print(f"  {failure.source}: {failure.code}: {failure.message}", file=self.err)
            if self.failed > len(self.failures):
                print(
                    f"  … and {self.failed - len(self.failures)} more (--json lists every one)", file=self.err
                )
        self.err.flush()

    def _print(self, line: str, stream: TextIO | None = None) -> None:
        stream = stream or self.out
        if self._bar is not None:
            self._bar.write(line, file=stream)
        else:
            stream.write(line + "\n")
        stream.flush()
