"""Continuous batching: concurrent `generate` calls share one running decode batch.

A call (`Job`) queues its requests and waits. One thread at a time drives the loop: the first caller
that finds it idle; when its own call is done it hands the loop to another waiting caller. Between
decode steps new requests are prefilled and their rows join the running batch (`DecodeBatch.rebuild`);
finished rows leave it in bulk. Each call returns when its own requests are done; `on_text` is called
from the driving thread, which may be another caller's.

When rows join: at once into an empty batch; else when the rebuild (a copy of the cache) pays: a quarter
of the rows are done (the batch is rebuilt to drop them anyway), a quarter of `max_batch_rows` is free
(a lightly loaded batch takes newcomers at once), or the oldest waiting request has waited
`MAX_WAIT_STEPS` steps (a full batch does not rebuild for every few rows that leave). Admission is in queue order while the rows fit
`max_batch_rows` and (on a GPU) the memory estimate fits the budget.

Lockstep (`Scheduler.lockstep`, for P&A pipelines, aggregate.py): threads that will call again and again
register as clients; the loop then steps only when none of them is between two calls (each is waiting in
a call, or gone), and admits queued requests in an order fixed by their content (queued at step, prompt,
seed), not by which thread came first. So the rows of every step, and with them each text, follow from the
work alone: the same command gives the same texts however the threads are timed. Without clients (the
server's requests) a request joins at the first step after it arrives.

Cancellation (`Request.cancel`, engines/base.py): before each step the loop drops the queued work of
cancelled requests and stops their rows in the batch, which is rebuilt without them before the forward
pass; their calls get `Result.failed(CANCELLED)` for them and return (once their other requests are done).

Out of GPU memory: a prefill that fails puts its requests back and admits half as many rows next time;
a decode step that fails sends the most recently admitted half of the requests back to the queue with
what they have generated (they resume by prefilling prompt + tokens: a row's text continues, its
uniform stream too). A single request that fails alone fails its call with a one-line AftError.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
from dataclasses import dataclass, field

import torch

from ...errors import AftError
from ..base import CANCELLED, Completion, OnText, Request, Result, Speculation, sample_seeds
from .batch import DecodeBatch, Row
from .drafts import NgramIndex
from .text import RowText

log = logging.getLogger(__name__)

MAX_WAIT_STEPS = 16  # decode steps a queued request waits at most for rows to leave before it joins anyway


@dataclass(eq=False)  # hashed by identity (Scheduler.inside)
class Job:
    """One `generate` call: its requests, their results as they complete, its streaming callback."""

    requests: list[Request]
    prompts: list[list[int]]
    results: list[Result | None]
    on_text: OnText | None = None
    id: int = 0
    rows_left: dict[int, int] = field(default_factory=dict)  # request index -> rows not finished
    rows: dict[int, list[Row]] = field(default_factory=dict)  # request index -> its rows
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or all(r is not None for r in self.results)


class Lockstep:
    """`clients` threads that call the engine again and again; each runs inside `client()` (see the module's
    docstring). A client counts as between calls from the start until it calls, and from each return until
    its next call or its `client()` exits."""

    def __init__(self, scheduler: Scheduler, clients: int):
        self.scheduler = scheduler
        scheduler._move(+clients)

    @contextlib.contextmanager
    def client(self):
        s = self.scheduler
        s.local.client = True
        try:
            yield
        finally:
            s.local.client = False
            s._move(-1)


@dataclass
class Waiting:
    """Queued work: a request's rows not started yet, or rows sent back by an out-of-memory step (they
    resume by prefilling their prompt and the tokens they have)."""

    rows: list[Row]
    since: int  # the scheduler's step count when queued

    @property
    def ids(self) -> list[int]:
        r = self.rows[0]
        return r.prompt + r.tokens


class Scheduler:
    def __init__(self, engine):
        self.eng = engine
        self.cond = threading.Condition()
        self.queue: collections.deque[Waiting] = collections.deque()
        self.driving = False
        self.batch = self._empty()
        self.steps = 0
        self.row_cap: int | None = None  # after an out-of-memory error: fewer rows, until the loop is idle
        self.ids = itertools.count()
        self.outside = 0  # lockstep clients between two calls: the loop waits for them (see the docstring)
        self.inside: set[Job] = set()  # lockstep clients' calls not done yet (or done, not counted back yet)
        self.local = threading.local()  # .client: this thread is a lockstep client

    def lockstep(self, clients: int) -> Lockstep:
        return Lockstep(self, clients)

    def _move(self, outside: int) -> None:
        with self.cond:
            self.outside += outside
            self.cond.notify_all()

    def _empty(self) -> DecodeBatch:
        e = self.eng
        return DecodeBatch([], e.device, e.eos_ids, e.tok, config=e.lm.config)

    # ------------------------------------------------------------------ calls
    def run(self, job: Job) -> None:
        """Queue the job's requests, drive the loop while no one else does, return when the job is done."""
        client = getattr(self.local, "client", False)
        self._enqueue(job)
        if client:
            with self.cond:  # in a call now: the loop need not wait for this thread until the call is done
                self.outside -= 1
                self.inside.add(job)
                self.cond.notify_all()
        try:
            self._run(job)
        finally:
            if client:
                with self.cond:
                    self._count_back(job)

    def _run(self, job: Job) -> None:
        with self.cond:
            while not job.done and self.driving:
                self.cond.wait()
            if job.done:
                return self._raise(job)
            self.driving = True
        try:
            while not job.done:
                with self.cond:
                    for j in [j for j in self.inside if j.done]:  # their threads will call again
                        self._count_back(j)
                    while self.outside > 0:  # lockstep clients still to call: their requests join this step
                        self.cond.wait()
                if not self.batch.rows and not self.queue:
                    raise RuntimeError("the decode loop is idle with requests unanswered")
                self._iterate()
        except BaseException as e:  # the loop itself failed: every call in it fails with this error
            self._fail_all(e)
            raise
        finally:
            with self.cond:
                for j in [j for j in self.inside if j.done]:  # before another caller drives: see above
                    self._count_back(j)
                self.driving = False
                if not self.queue and not self.batch.rows:
                    self.row_cap = None
                self.cond.notify_all()
        self._raise(job)

    def _count_back(self, job: Job) -> None:
        """A lockstep client's call is done: its thread is between calls from now (under self.cond). Counted
        by the driving thread as soon as the call is done, before the next step or hand-over, not when the
        caller's thread gets round to it: so when the next step starts does not depend on thread timing."""
        if job in self.inside:
            self.inside.discard(job)
            self.outside += 1
            self.cond.notify_all()

    def _raise(self, job: Job) -> None:
        if job.error is not None:
            raise job.error

    def _enqueue(self, job: Job) -> None:
        e = self.eng
        job.id = next(self.ids)
        order = sorted((i for i in range(len(job.requests)) if job.results[i] is None), key=lambda i: len(job.prompts[i]))
        waiting = []
        for i in order:
            sp, prompt = job.requests[i].params, job.prompts[i]
            max_new = e._max_new(sp, len(prompt))
            rows = [Row(job, i, j, seed, sp, prompt, max_new) for j, seed in enumerate(sample_seeds(sp))]
            lookup = NgramIndex(prompt) if e.spec_tokens else None  # the prompt's, copied for each sample
            for row in rows:
                if sp.stop or job.on_text is not None:
                    row.text = RowText(e.tok, sp.stop)
                if lookup is not None:
                    row.drafts, row.spec_tokens, row.draft_len = lookup.copy(), e.spec_tokens, e.spec_tokens
            job.rows[i], job.rows_left[i] = rows, len(rows)
            waiting.append(Waiting(rows, 0))
        with self.cond:
            for w in waiting:
                w.since = self.steps
            self.queue.extend(waiting)

    # ------------------------------------------------------------------- loop
    @torch.inference_mode()
    def _iterate(self) -> None:
        """Admit what should join, one decode step for the batch, record and stream what it drew."""
        batch = self.batch
        stopped = self._cancel()
        joining = self._admit()
        if joining is not None:
            batch.rebuild(joining)
        elif batch.rows and (stopped or 4 * (len(batch.rows) - batch.live) >= len(batch.rows)):
            batch.rebuild()
        if not batch.rows:
            return
        self._forward()
        if batch.rows:  # (none left when an out-of-memory error failed the one request in it)
            self._record(batch.rows, batch.sample)
        if not batch.live:
            batch.rebuild()  # every row is done: the cache is freed now, not when the next call comes

    def _cancel(self) -> bool:
        """Drop the queued work of cancelled requests and stop their rows; answer them CANCELLED. True when
        rows of the batch stopped (the batch is rebuilt without them before the next forward pass)."""
        def cancelled(row: Row) -> bool:
            return row.job.requests[row.request].cancelled

        with self.cond:
            gone = [w.rows[0] for w in self.queue if cancelled(w.rows[0])]
            if gone:
                self.queue = collections.deque(w for w in self.queue if not cancelled(w.rows[0]))
        stopped = [r for r in self.batch.rows if not r.finish and cancelled(r)]
        for row in stopped:
            row.finish = "stop"
        for row in gone + stopped:
            job, i = row.job, row.request
            if job.results[i] is None:
                job.results[i] = Result.failed(CANCELLED, prompt_tokens=len(job.prompts[i]))
                log.debug("call %d: request %d cancelled", job.id, i)
        if gone or stopped:
            with self.cond:
                self.cond.notify_all()
        return bool(stopped)

    def _record(self, rows: list[Row], draw) -> None:
        """Draw the rows' next tokens (`draw`), then stream their new text and complete the finished ones."""
        live = [r for r in rows if not r.finish]
        draw()
        for row in live:
            job = row.job
            if job.error is not None:
                continue
            if job.on_text is not None:
                self._stream(row, row.text.ready() if not row.finish else None)
            if row.finish:
                self._complete(row)

    def _stream(self, row: Row, delta: str | None) -> None:
        """Send a row's new text; at its end (`delta` None) whatever of its final text is not sent yet."""
        if delta is None:
            delta = row.text.rest(row.final_text(self.eng.tok))
        if delta:
            try:
                row.job.on_text(row.request, row.index, delta)
            except BaseException as e:  # the caller's callback failed: its call fails, the others go on
                self._fail(row.job, e)

    def _complete(self, row: Row) -> None:
        job, i = row.job, row.request
        job.rows_left[i] -= 1
        if job.rows_left[i]:
            return
        res = Result(completions=[], prompt_tokens=len(job.prompts[i]))
        for r in job.rows[i]:
            res.completions.append(Completion(text=r.final_text(self.eng.tok), tokens=len(r.tokens),
                                              finish_reason=r.finish))
            res.seeds.append(r.seed)
            if r.drafts is not None:
                res.speculation = res.speculation or Speculation()
                res.speculation.add(r.forwards, r.drafted, r.accepted)
        job.results[i] = res
        if job.done:
            with self.cond:
                self.cond.notify_all()

    def _forward(self) -> None:
        """One decode step; out of memory, fewer rows (see the module's docstring) and again."""
        e, batch = self.eng, self.batch
        while batch.rows:
            try:
                batch.forward(e.lm, e.cache_kw)
            except torch.OutOfMemoryError:
                self._out_of_memory()
                continue
            self.steps += 1
            if e.step_log is not None:  # rows per call in this step
                e.step_log.append(dict(collections.Counter(r.job.id for r in batch.rows if not r.finish)))
            return

    # -------------------------------------------------------------- admission
    def _admit(self) -> DecodeBatch | None:
        """Prefill the queued requests that should join now; their rows with their first tokens drawn."""
        e, batch = self.eng, self.batch
        with self.cond:
            if not self.queue:
                return None
            # by content, not arrival: requests queued at the same step by different threads join in one order
            self.queue = collections.deque(sorted(self.queue, key=lambda w: (w.since, len(w.ids), w.ids,
                                                                             w.rows[0].seed or 0)))
            live = batch.live
            cap = e.max_batch_rows if self.row_cap is None else self.row_cap
            if batch.rows and not (4 * (len(batch.rows) - live) >= len(batch.rows) or 4 * (cap - live) >= cap
                                   or self.steps - self.queue[0].since >= MAX_WAIT_STEPS):
                return None
            budget = e.memory_budget()
            taken: list[Waiting] = []
            rows = live
            while self.queue:
                w = self.queue[0]
                n = len(w.rows)
                if (taken or live) and (rows + n > cap or (budget is not None and not self._fits(taken + [w], budget))):
                    break
                taken.append(self.queue.popleft())
                rows += n
        if not taken:
            return None
        try:
            joining = self._prefill(taken)
        except torch.OutOfMemoryError:
            with self.cond:
                self.queue.extendleft(reversed(taken))
            self._prefill_out_of_memory(taken)
            return None
        if e.step_log is not None:
            e.step_log.append({"prefill": len(joining.rows)})
        self._record(joining.rows, joining.sample)
        return joining

    def _fits(self, taken: list[Waiting], budget: int) -> bool:
        """The memory estimate of the batch once `taken` joins (during the rebuild the old cache is kept too)."""
        batch = self.batch
        live = [r for r in batch.rows if not r.finish]
        rows = live + [r for w in taken for r in w.rows]
        longest = max(len(w.ids) for w in taken)
        length = max(batch.live_length(), longest)
        positions = length + max(r.max_new - len(r.tokens) for r in rows)
        return self.eng.chunk_bytes(len(rows) + len(live), len(taken), longest, positions) <= budget

    def _prefill(self, taken: list[Waiting]) -> DecodeBatch:
        e = self.eng
        blocks, place, logits = e._prefill([w.ids for w in taken])
        rows, where, next_pos, index = [], [], [], []
        for s, w in enumerate(taken):
            for row in w.rows:
                rows.append(row)
                where.append(place[s])
                next_pos.append(len(w.ids))
                index.append(s)
        return DecodeBatch(rows, e.device, e.eos_ids, e.tok, next_pos=next_pos,
                           logits=logits[torch.tensor(index, device=logits.device)], blocks=blocks, place=where)

    # ---------------------------------------------------------- out of memory
    def _prefill_out_of_memory(self, taken: list[Waiting]) -> None:
        e, live = self.eng, self.batch.live
        if e.device.type == "cuda":
            torch.cuda.empty_cache()
        rows = sum(len(w.rows) for w in taken)
        if len(taken) == 1 and not live:
            self._too_big(taken[0].rows)
            return
        log.warning("out of GPU memory prefilling %d requests (%d rows) beside %d running rows; admitting fewer",
                    len(taken), rows, live)
        self.row_cap = live if live else max(1, rows // 2)

    def _out_of_memory(self) -> None:
        """A decode step ran out of memory: the newest half of the requests go back to the queue, with what they
        have generated; a request alone in the batch fails its call."""
        e, batch = self.eng, self.batch
        if e.device.type == "cuda":
            torch.cuda.empty_cache()
        requests = list(dict.fromkeys((r.job.id, r.request) for r in batch.rows if not r.finish))
        if len(requests) == 1:
            self._too_big([r for r in batch.rows if not r.finish])
            batch.rebuild()
            return
        back = set(requests[len(requests) // 2:])
        keep = [k for k, r in enumerate(batch.rows) if not r.finish and (r.job.id, r.request) not in back]
        sent = [r for r in batch.rows if not r.finish and (r.job.id, r.request) in back]
        log.warning("out of GPU memory on a decode step of %d rows; %d rows wait for room", len(batch.rows), len(sent))
        batch.rebuild(keep=keep)  # a row sent back resumes from its tokens (its last one was drawn, not fed)
        self.row_cap = len(keep)
        with self.cond:
            self.queue.extendleft(reversed([Waiting([r], self.steps) for r in sent]))

    def _too_big(self, rows: list[Row]) -> None:
        r = rows[0]
        sp = r.params
        self._fail(r.job, AftError(
            f"{self.eng.model}: out of GPU memory on a single request ({sp.n} samples of a {len(r.prompt)}-token "
            f"prompt, max_tokens {sp.max_tokens}); lower n or max_tokens, or use the vllm engine"))

    # --------------------------------------------------------------- failures
    def _fail(self, job: Job, error: BaseException) -> None:
        """The call fails: its rows stop (they leave at the next rebuild), its queued requests are dropped."""
        if job.error is None:
            job.error = error
        for rows in job.rows.values():
            for r in rows:
                r.finish = r.finish or "stop"
        with self.cond:
            self.queue = collections.deque(w for w in self.queue if w.rows[0].job is not job)
            self.cond.notify_all()

    def _fail_all(self, error: BaseException) -> None:
        jobs = {id(r.job): r.job for r in self.batch.rows}
        with self.cond:
            jobs.update({id(w.rows[0].job): w.rows[0].job for w in self.queue})
        for job in jobs.values():
            self._fail(job, error)
        self.batch = self._empty()
