"""Running requests on engines from the server: threads, batching, and the way back to asyncio.

An engine call blocks (it decodes, or waits on HTTP), so it runs in a thread,
never in the event loop. How depends on the engine (docs/serve.md):

- a continuous engine (`Engine.continuous`: concurrent calls share its work)
  gets each job in a thread of its own, at once;
- any other engine has one worker thread (its lock, INTERFACES.md item 2): the
  jobs waiting for it when it comes free go in as ONE batch (those for the same
  engine object: requests with the same P&A settings), up to `max_batch`.

A job's `on_text(completion_index, delta)` and `done(result, error)` are called
from the engine's thread; the server turns them into asyncio events with
`loop.call_soon_threadsafe`. A job whose client went away is cancelled through
its request's `cancel` event (engines/base.py): before it started, it is
dropped here; while it runs, the engine stops its work (the transformers
engine's rows leave the batch before the next step, the openai engine closes
its streams, P&A starts no further layer) and the other jobs of its batch go on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engines.base import Engine, Request, Result

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    engine: Engine  # what to call (the P&A engine of this request's settings, or the plain engine)
    lane: Engine  # the engine whose work it is (the inner engine): jobs of one non-continuous lane run one batch at a time
    request: Request  # with its `cancel` event (set by `cancel`)
    on_text: Callable[[int, str], None]
    done: Callable[[Result | None, BaseException | None], None]

    def __post_init__(self):
        if self.request.cancel is None:
            self.request.cancel = threading.Event()

    def cancel(self) -> None:
        """The client went away: drop the job, or stop its work in the engine."""
        self.request.cancel.set()

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled


@dataclass
class _Lane:
    jobs: list[Job] = field(default_factory=list)
    wake: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None


class Dispatcher:
    def __init__(self, on_move: Callable[[int, int], None] = lambda running, waiting: None, max_batch: int = 64):
        self.on_move = on_move  # (change in running jobs, change in waiting jobs): the metrics' gauges
        self.max_batch = max_batch
        self._lanes: dict[int, _Lane] = {}
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        if job.engine.continuous:
            self.on_move(1, 0)
            threading.Thread(target=self._run, args=([job],), name="aft-serve-job", daemon=True).start()
            return
        with self._lock:
            lane = self._lanes.get(id(job.lane))
            if lane is None:
                lane = self._lanes[id(job.lane)] = _Lane()
                lane.thread = threading.Thread(target=self._work, args=(lane,), name="aft-serve-engine", daemon=True)
                lane.thread.start()
        self.on_move(0, 1)
        with lane.wake:
            lane.jobs.append(job)
            lane.wake.notify()

    def _work(self, lane: _Lane) -> None:
        """One lane's thread: take the waiting jobs of the oldest one's engine as one batch, run it, repeat."""
        while True:
            with lane.wake:
                while not lane.jobs:
                    lane.wake.wait()
                dropped = [j for j in lane.jobs if j.cancelled]
                live = [j for j in lane.jobs if not j.cancelled]
                first = live[0] if live else None
                batch = [j for j in live if j.engine is first.engine][:self.max_batch] if first else []
                lane.jobs = [j for j in live if j not in batch]
            self.on_move(len(batch), -len(batch) - len(dropped))
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        def on_text(i: int, j: int, delta: str) -> None:
            batch[i].on_text(j, delta)

        try:
            results = batch[0].engine.generate([j.request for j in batch], on_text=on_text)
        except BaseException as e:  # noqa: BLE001  (reported to every client of the batch, and logged)
            log.exception("engine call failed (%d requests)", len(batch))
            for job in batch:
                job.done(None, e)
        else:
            for job, res in zip(batch, results):
                job.done(res, None)
        finally:
            self.on_move(-len(batch), 0)
