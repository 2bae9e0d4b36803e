"""The study's progress line on stderr: runs done of all, running, failed, and tqdm's estimate of the
time left (from the rate of the runs finished in this session: reused runs count as done, not as speed)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, finished: int, failed: int, slots: int, name: str, enabled: bool = True):
        from tqdm import tqdm

        self.total, self.finished, self.failed, self.slots = total, finished, failed, slots
        self.bar = tqdm(total=total, initial=finished, unit="run", desc=name, file=sys.stderr,
                        disable=not enabled, dynamic_ncols=True, smoothing=0.05)
        self._postfix()

    def running(self) -> int:
        return min(self.slots, self.total - self.finished)

    def done(self, failed: bool) -> None:
        self.finished += 1
        self.failed += failed
        self._postfix(refresh=False)
        self.bar.update(1)  # draws the line once, with the new counts

    def say(self, message: str) -> None:
        if self.bar.disable:
            print(message, file=sys.stderr)
        else:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()

    def _postfix(self, refresh: bool = True) -> None:
        self.bar.set_postfix_str(f"running {self.running()}, failed {self.failed}", refresh=refresh)
