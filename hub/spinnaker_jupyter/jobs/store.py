"""The job store: one SQLAlchemy table of jobs (SQLite in data_dir by default, any SQLAlchemy URL, e.g. PostgreSQL).

Fields follow the EBRAINS job queue API v3 (code, command, collab, input_data, hardware_platform, hardware_config,
tags, user_id, status, timestamps, provenance, resource_usage, output files). Logs live in files beside the outputs
(they are appended while a job runs); the store keeps what the API answers and what the runner needs to recover.

Claiming is a compare-and-set (`UPDATE ... WHERE id = ? AND status = 'submitted'`), so two runners, or two
threads of one, never take the same job, on SQLite as on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

STATUSES = ("submitted", "running", "finished", "error", "removed")
ACTIVE = ("submitted", "running")
DONE = ("finished", "error")


def now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(255), index=True)
    collab: Mapped[str] = mapped_column(String(255), index=True)
    code: Mapped[str] = mapped_column(Text)
    command: Mapped[str] = mapped_column(Text)
    hardware_platform: Mapped[str] = mapped_column(String(64))
    hardware_config: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON
    input_data: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON list
    tags: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    status: Mapped[str] = mapped_column(String(16), index=True, default="submitted")
    timestamp_submission: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    timestamp_started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    timestamp_completion: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    provenance: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON
    resource_usage: Mapped[float | None] = mapped_column(Float, nullable=True)  # core-hours
    output_files: Mapped[str] = mapped_column(Text, default="[]")  # JSON [{path, size, hash, content_type}]
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # how many times a runner has started it
    runner_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pgid: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the job's process group while it runs
    run_uid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # e.g. "by an operator"
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)  # what a running job waits for, in words
    # when its command started (claimed jobs wait for a board, a Slurm slot, a pip install first): until then the
    # API says "submitted", as upstream's status means the job has not run yet (public_status)
    timestamp_command: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


#: Columns added after the first release: (name, SQL type), added to an existing table at start-up.
ADDED_COLUMNS = (("cancel_reason", "TEXT"), ("detail", "TEXT"), ("timestamp_command", "TIMESTAMP WITH TIME ZONE"))


def public_status(job: Job) -> str:
    """The status users see (API, Jobs page): a claimed job is "running" only once its command runs."""
    return "submitted" if job.status == "running" and job.timestamp_command is None else job.status


class Store:
    def __init__(self, url: str):
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):

            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _record):  # readers do not wait for the runner's writes
                dbapi_conn.execute("PRAGMA journal_mode=WAL")

        Base.metadata.create_all(self.engine)
        self._add_columns()
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def _add_columns(self) -> None:
        """A store made by an earlier release lacks the newer columns: add them (nullable, so old rows stay valid)."""
        have = {c["name"] for c in inspect(self.engine).get_columns("jobs")}
        missing = [(name, kind) for name, kind in ADDED_COLUMNS if name not in have]
        if missing:
            with self.engine.begin() as conn:
                for name, kind in missing:
                    conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {name} {kind}"))

    # --- users' side -------------------------------------------------------------------------------------------
    def create(self, user_id: str, fields: dict) -> Job:
        with self.session() as s, s.begin():
            job = Job(user_id=user_id, status="submitted", timestamp_submission=now(), **fields)
            s.add(job)
        return job

    def get(self, job_id: int) -> Job | None:
        with self.session() as s:
            return s.get(Job, job_id)

    def query(
        self,
        user_id: str,
        statuses: Iterable[str] = (),
        collabs: Iterable[str] = (),
        tags: Iterable[str] = (),
        size: int = 10,
        from_index: int = 0,
    ) -> list[Job]:
        q = select(Job).where(Job.user_id == user_id)
        statuses, collabs = list(statuses), list(collabs)
        q = q.where(_public_status_in(statuses)) if statuses else q.where(Job.status != "removed")
        if collabs:
            q = q.where(Job.collab.in_(collabs))
        q = q.order_by(Job.id.desc()).offset(from_index).limit(size)
        with self.session() as s:
            jobs = list(s.scalars(q))
        tags = set(tags)
        return [j for j in jobs if tags <= set(json.loads(j.tags or "[]"))] if tags else jobs

    def request_removal(self, job_id: int, reason: str | None = None) -> str:
        """Mark a job removed; a running one is only flagged (its runner stops it, saying it was cancelled `reason`,
        default "by its owner"). Returns the status before. Compare-and-set like the claim, so a job the runner
        takes at the same moment is flagged, not overwritten."""
        while True:
            before = self.get(job_id).status
            with self.session() as s, s.begin():
                if before == "running":
                    done = s.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status == "running")
                        .values(cancel_requested=True, cancel_reason=reason)
                    )
                elif before == "removed":
                    return before
                else:
                    done = s.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status == before)
                        .values(status="removed", timestamp_completion=func.coalesce(Job.timestamp_completion, now()))
                    )
            if done.rowcount == 1:
                return before

    def cancel_all_of(self, user_id: str, reason: str | None = None) -> dict[str, list[int]]:
        """Cancel every queued or running job of a user (their account is being removed): {status before: ids}.
        Queued ones are removed at once; running ones are flagged and their runner stops them, saying `reason`."""
        with self.session() as s:
            ids = list(s.scalars(select(Job.id).where(Job.user_id == user_id, Job.status.in_(ACTIVE))))
        done: dict[str, list[int]] = {}
        for job_id in ids:
            done.setdefault(self.request_removal(job_id, reason), []).append(job_id)
        return done

    # --- the runner's side -------------------------------------------------------------------------------------
    def claim_next(self, runner_id: str) -> Job | None:
        """Take the oldest submitted job, or None. Compare-and-set, so a job is claimed exactly once."""
        while True:
            with self.session() as s:
                candidate = s.scalars(select(Job.id).where(Job.status == "submitted").order_by(Job.id).limit(1)).first()
            if candidate is None:
                return None
            with self.session() as s, s.begin():
                done = s.execute(
                    update(Job)
                    .where(Job.id == candidate, Job.status == "submitted")
                    .values(
                        status="running",
                        runner_id=runner_id,
                        timestamp_started=now(),
                        attempts=Job.attempts + 1,
                        cancel_requested=False,
                        cancel_reason=None,
                        detail=None,
                        timestamp_command=None,
                    )
                )
            if done.rowcount == 1:
                return self.get(candidate)

    def set_process(self, job_id: int, pgid: int | None, uid: int | None) -> None:
        """The job's command started (its process group) or ended (None)."""
        if pgid is None:
            self._update(job_id, pgid=None, run_uid=None)
        else:
            self._update(job_id, pgid=pgid, run_uid=uid, timestamp_command=func.coalesce(Job.timestamp_command, now()))

    def finish(self, job_id: int, status: str, provenance: dict, files: list[dict], usage: float | None) -> None:
        self._update(
            job_id,
            status=status,
            provenance=json.dumps(provenance),
            output_files=json.dumps(files),
            resource_usage=usage,
            timestamp_completion=now(),
            pgid=None,
            runner_id=None,
            detail=None,
        )

    def requeue(self, job_id: int) -> None:
        self._update(
            job_id,
            status="submitted",
            pgid=None,
            runner_id=None,
            timestamp_started=None,
            timestamp_command=None,
            detail=None,
        )

    def set_detail(self, job_id: int, detail: str | None) -> None:
        """What the running job does or waits for, in words (e.g. its place in the board queue)."""
        self._update(job_id, detail=detail)

    def interrupted(self, runner_id: str | None = None) -> list[Job]:
        """Jobs left `running` by a runner that is gone (all of them at start-up), or by `runner_id`."""
        q = select(Job).where(Job.status == "running")
        if runner_id:
            q = q.where(Job.runner_id == runner_id)
        with self.session() as s:
            return list(s.scalars(q))

    def cancel_requested(self, job_id: int) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def cancel_words(self, job_id: int) -> str:
        """Who cancelled a flagged job, as the log says it ("by its owner" unless another reason was given)."""
        with self.session() as s:
            return s.scalar(select(Job.cancel_reason).where(Job.id == job_id)) or "by its owner"

    # --- the operator's side (spinnaker-jupyter jobs) -----------------------------------------------------------
    def all_jobs(self, users: Iterable[str] = (), statuses: Iterable[str] = ()) -> list[Job]:
        q = select(Job)
        users, statuses = list(users), list(statuses)
        if users:
            q = q.where(Job.user_id.in_(users))
        if statuses:
            q = q.where(Job.status.in_(statuses))
        with self.session() as s:
            return list(s.scalars(q.order_by(Job.id)))

    def ended_before(self, before: datetime) -> list[Job]:
        """Jobs that ended (finished, error, removed) before `before`."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Job)
                    .where(Job.status.in_(DONE + ("removed",)), Job.timestamp_completion < before)
                    .order_by(Job.id)
                )
            )

    def delete(self, job_id: int) -> None:
        """Drop an ended job's record (only one that has ended: a running or queued job is never deleted)."""
        with self.session() as s, s.begin():
            s.execute(delete(Job).where(Job.id == job_id, Job.status.in_(DONE + ("removed",))))

    def expired(self, before: datetime) -> list[Job]:
        with self.session() as s:
            return list(
                s.scalars(select(Job).where(Job.status.in_(DONE + ("removed",)), Job.timestamp_completion < before))
            )

    def clear_outputs(self, job_id: int) -> None:
        self._update(job_id, output_files="[]")

    def _update(self, job_id: int, **values) -> None:
        with self.session() as s, s.begin():
            s.execute(update(Job).where(Job.id == job_id).values(**values))


def _public_status_in(statuses: list[str]):
    """The SQL condition for "public_status(job) in statuses"."""
    started = Job.timestamp_command.is_not(None)
    conditions = [Job.status.in_([s for s in statuses if s not in ("submitted", "running")])]
    if "submitted" in statuses:
        conditions.append(or_(Job.status == "submitted", and_(Job.status == "running", ~started)))
    if "running" in statuses:
        conditions.append(and_(Job.status == "running", started))
    return or_(*conditions)
