"""JobStore on a real SQLite file: idempotency, pagination, filters, events, restarts, threads."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from zerotrain.service.errors import InvalidArgument, JobNotFound
from zerotrain.service.model import CheckpointInfo, JobRecord, JobState
from zerotrain.service.spec import JobSpec
from zerotrain.service.store import JobStore


def make_record(job_id: str, *, owner: str = "alice", key: str | None = None, **labels) -> JobRecord:
    spec = JobSpec.from_dict({"name": f"job-{job_id}", "task": "digits", "labels": labels})
    return JobRecord(
        job_id=job_id,
        owner=owner,
        spec=spec,
        state=JobState.PENDING,
        state_reason="accepted",
        created_at=100.0,
        updated_at=100.0,
        started_at=None,
        finished_at=None,
        attempt=0,
        latest_metrics=None,
        checkpoint=None,
        idempotency_key=key,
        ray_job_id=None,
    )


@pytest.fixture
def store(tmp_path: Path):
    s = JobStore(tmp_path / "jobs.db")
    yield s
    s.close()


def test_wal_mode_and_schema_version(store: JobStore):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_round_trip_and_not_found(store: JobStore):
    record = make_record("j-1", team="a")
    assert store.create_job(record) == (record, True)
    assert store.get_job("j-1") == record
    with pytest.raises(JobNotFound, match="j-2"):
        store.get_job("j-2")
    with pytest.raises(JobNotFound):
        store.update_job("j-2", now=1.0, attempt=1)


def test_idempotency_key_returns_the_first_job(store: JobStore):
    _, created = store.create_job(make_record("j-1", key="k"))
    again, created_again = store.create_job(make_record("j-2", key="k"))
    other, created_other = store.create_job(make_record("j-3", owner="bob", key="k"))
    assert created and not created_again and created_other
    assert again.job_id == "j-1" and other.job_id == "j-3"
    assert store.find_by_idempotency_key("alice", "k").job_id == "j-1"
    assert store.find_by_idempotency_key("alice", "nope") is None
    with pytest.raises(JobNotFound):
        store.get_job("j-2")  # nothing half-written


def test_keyset_pagination_with_filters(store: JobStore):
    for i in range(7):
        store.create_job(make_record(f"j-{i}", owner="alice" if i % 2 else "bob", team=f"t{i % 3}"))
    store.update_job("j-3", state=JobState.RUNNING, reason="", now=101.0)

    pages, token = [], ""
    while True:
        page, token = store.list_jobs(page_size=3, page_token=token)
        pages.append([r.job_id for r in page])
        if not token:
            break
    assert pages == [["j-6", "j-5", "j-4"], ["j-3", "j-2", "j-1"], ["j-0"]]

    # A job created between pages does not shift the next page (keyset, not offset).
    page, token = store.list_jobs(page_size=2)
    store.create_job(make_record("j-new", owner="carol"))
    assert [r.job_id for r in store.list_jobs(page_size=2, page_token=token)[0]] == ["j-4", "j-3"]

    ids = lambda **kw: [r.job_id for r in store.list_jobs(**kw)[0]]  # noqa: E731
    assert ids(owner="alice") == ["j-5", "j-3", "j-1"]
    assert ids(state=JobState.RUNNING) == ["j-3"]
    assert ids(labels={"team": "t0"}) == ["j-6", "j-3", "j-0"]
    assert ids(owner="bob", labels={"team": "t0"}) == ["j-6", "j-0"]
    assert ids(labels={"team": "t0", "other": "x"}) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"page_size": 0}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"page_token": "eyJ2IjogMn0"}, "page_token"),  # valid base64 JSON, wrong shape
    ],
)
def test_bad_list_arguments(store: JobStore, kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        store.list_jobs(**kwargs)


def test_event_sequences_transitions_and_compare_and_set(store: JobStore):
    store.create_job(make_record("j-1"))
    record, event = store.update_job(
        "j-1", state=JobState.RUNNING, reason="started", now=101.0, started_at=101.0, attempt=1
    )
    assert record.state == JobState.RUNNING and record.started_at == 101.0
    assert (event.sequence, event.state, event.attempt) == (2, JobState.RUNNING, 1)
    # compare-and-set: not PENDING any more, so nothing changes
    assert store.update_job("j-1", state=JobState.CANCELLED, now=102.0, expect_states=[JobState.PENDING]) is None
    record, event = store.append_metrics(
        "j-1", {"step": 5, "loss": float("nan")}, now=103.0, attempt=1,
        checkpoint=CheckpointInfo(step=5, path="/c/5", time=103.0),
    )  # fmt: skip
    assert event.sequence == 3 and event.metrics == {"step": 5, "loss": None}
    assert record.latest_metrics == {"step": 5, "loss": None}
    assert record.checkpoint == CheckpointInfo(step=5, path="/c/5", time=103.0)
    store.update_job("j-1", state=JobState.SUCCEEDED, reason="done", now=104.0, finished_at=104.0)
    events = store.events("j-1")
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert [e.kind for e in events] == ["state", "state", "metrics", "state"]
    assert store.events("j-1", after_sequence=2) == events[2:]
    assert store.last_sequence("j-1") == 4
    # A late record updates the job but adds no event after the terminal one.
    record, event = store.append_metrics("j-1", {"step": 6}, now=105.0, attempt=1, append_event=False)
    assert event is None and record.latest_metrics == {"step": 6} and store.last_sequence("j-1") == 4
    assert store.count_by_state()["SUCCEEDED"] == 1


def test_metrics_events_are_capped_state_events_kept(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.db", max_metrics_events=5)
    store.create_job(make_record("j-1"))
    store.update_job("j-1", state=JobState.RUNNING, now=101.0)
    for step in range(20):
        store.append_metrics("j-1", {"step": step}, now=102.0 + step, attempt=1)
    events = store.events("j-1")
    assert [e.kind for e in events[:2]] == ["state", "state"]  # states never pruned
    assert [e.metrics["step"] for e in events[2:]] == [15, 16, 17, 18, 19]
    assert [e.sequence for e in events[2:]] == [18, 19, 20, 21, 22]  # numbers never reused
    store.close()


def test_records_survive_a_restart(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.db")
    store.create_job(make_record("j-1", key="k", team="a"))
    store.append_metrics("j-1", {"step": 1}, now=101.0, attempt=1)
    before = (store.get_job("j-1"), store.events("j-1"))
    store.close()

    reopened = JobStore(tmp_path / "jobs.db")
    assert (reopened.get_job("j-1"), reopened.events("j-1")) == before
    assert reopened.create_job(make_record("j-2", key="k"))[1] is False
    assert reopened.update_job("j-1", attempt=2, now=102.0)[0].attempt == 2
    reopened.close()


def test_unknown_schema_version_is_refused(tmp_path: Path):
    conn = sqlite3.connect(tmp_path / "jobs.db")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        JobStore(tmp_path / "jobs.db")


def test_concurrent_writers_and_readers(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.db")
    store.create_job(make_record("j-1"))
    errors: list[BaseException] = []

    def ingest(worker: int) -> None:
        try:
            for i in range(50):
                store.append_metrics("j-1", {"step": i, "worker": worker}, now=100.0 + i, attempt=1)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def submit(worker: int) -> None:
        try:
            for i in range(20):
                store.create_job(make_record(f"j-{worker}-{i}", owner=f"o{worker}", key="same"))
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        # Every read is a committed snapshot: a dense prefix of the event log,
        # never behind the job row's counter read before it.
        try:
            for _ in range(100):
                last = store.last_sequence("j-1")
                seen = [e.sequence for e in store.events("j-1", limit=10_000)]
                assert seen == list(range(1, len(seen) + 1)) and len(seen) >= last
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ingest, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=submit, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [e.sequence for e in store.events("j-1", limit=10_000)] == list(range(1, 202))
    # One job per owner for the shared idempotency key, whatever the interleaving.
    for worker in range(4):
        assert len(store.list_jobs(owner=f"o{worker}")[0]) == 1
    store.close()


def test_close_while_other_threads_read(tmp_path: Path):
    """close() waits for reads in flight; later reads fail cleanly, never crash."""
    store = JobStore(tmp_path / "jobs.db")
    store.create_job(make_record("j1"))
    outcomes: list[str] = []
    started = threading.Barrier(5)

    def read_until_closed() -> None:
        started.wait()
        while True:
            try:
                store.get_job("j1")
                store.events("j1")
            except sqlite3.ProgrammingError as exc:
                outcomes.append(str(exc))
                return

    readers = [threading.Thread(target=read_until_closed) for _ in range(4)]
    for t in readers:
        t.start()
    started.wait()
    store.close()
    for t in readers:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in readers)
    assert outcomes == ["the job store is closed"] * 4
