"""The Redis layout of a job, and the atomic scripts that keep its counts exact under redelivery.

Owns: key names, the job record's fields and state machine, and every write to a job. Results are written
per item index with HSETNX inside one Lua script that also bumps the counts and finishes the job, so a chunk
delivered twice (a killed worker, an expired visibility timeout) can never duplicate a result or count one
twice: the first write of an index wins. Every key of a job carries the job's TTL. Used by both the job
client (`worker.jobs`) and the worker (`worker.tasks`). Must not know: Celery, torch, the model.

Keys (the `{id}` hash tag keeps a job's keys in one Redis Cluster slot):
  safety:job:{id}           hash   the job record (state, total, done, failed, chunks, chunk_size, ttl_s,
                                   created, started, finished, updated, sent_at, model, digest, queue, error,
                                   nonce; every time in Redis's clock, epoch seconds: one clock for the
                                   submitter, every worker and the sweeper, whatever their hosts' say)
  safety:job:{id}:items     hash   index -> item JSON (deleted when the job finishes done or failed; a
                                   cancelled job keeps it, for its `cancelled` lines, until delete or the TTL)
  safety:job:{id}:results   hash   index -> result JSON (exactly one per item)
  safety:job:{id}:attempts  hash   chunk -> deliveries that started classifying it
  safety:job:{id}:errors    hash   chunk -> the last error a delivery raised
  safety:job:{id}:enqueued  set    chunks already sent to the queue (a resumed submit skips them)
  safety:job:{id}:submitter string the submit lease: a token of the one submit storing and queueing the job
                                   now; expires SUBMIT_LEASE_S after that submit last renewed it (a submit
                                   that died frees the job by then), deleted when it ends
  safety:job:{id}:deleted   string a deleted job's tombstone: its id stays reserved for the job's remaining
                                   TTL, so the job's leftover chunk messages never act on a new job
  safety:dead_letter        list   JSON {job_id, chunk, attempts, error, at}, newest first, capped
  safety:jobs:open          list   ids of submitted jobs not yet seen finished, each once (the lost-chunk
                                   sweeper's list, `worker.reclaim`; a list so that KEDA, which reads list
                                   lengths, keeps a worker while it is not empty); a job leaves it once the
                                   sweeper sees it finished or expired, or its submission stopped (until a
                                   resumed submit puts it back), and when it is deleted

A job's generation: `nonce` (random, written once by the submit that creates the record, never changed) names
this job among all the jobs that ever had its id. Every chunk message carries it (`worker.app.send_chunk`:
args `[job_id, chunk, nonce]`), and every script through which a message acts on a job (start, write
results, note an error) checks it atomically: a message whose nonce is not the record's belongs to an
earlier job of that id (deleted after its tombstone expired, or expired and the id submitted again) and
acts on nothing (`stale`). The tombstone alone does not cover a message that outlives the reservation (a
long backlog), nor a job that expired. Rolling-upgrade compatibility: a message without a nonce (sent by
the previous release) is not checked, as before; a record without one (created by the previous release) is
resumed and re-sent with none, so its messages are not checked either; a message with a nonce is stale
against a record without one (that record is another job's).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from model.errors import InvalidInputError, NotFoundError

STATES = ("submitting", "queued", "running", "done", "failed", "cancelled")
FINISHED = frozenset({"done", "failed", "cancelled"})
DEAD_LETTER = "safety:dead_letter"
DEAD_LETTER_MAX = 10_000
ACTIVE_JOBS = "safety:jobs:open"
# A job still `submitting` whose submitter stored nothing for this long was abandoned (an interrupted or
# killed `safety submit`, a gRPC server that crashed during a SubmitJob): waiting for it is an error, and the
# sweeper stops watching it. Storing one chunk takes well under a second; this leaves room for a slow link,
# a large chunk.
SUBMIT_STALL_S = 120.0
# One submit at a time stores and queues a job: it holds the job's submit lease (`JobStore.hold_submit`),
# renewing it before each chunk it stores and sends, and releases it when it ends. A submit that dies frees
# the job this long after it last renewed the lease (well before SUBMIT_STALL_S calls its job stopped).
SUBMIT_LEASE_S = 30.0
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The keys of `model.Result.to_dict()` (a test keeps them in step); a result line adds `index` and `error`.
RESULT_FIELDS = ("id", "scores", "logits", "flagged", "flagged_labels", "tokens", "windows", "spans")


def result_line(index: int, result: dict[str, Any]) -> dict[str, Any]:
    """A classified item: the Classify result shape plus its index in the job and `error: null`."""
    return {"index": index, **result, "error": None}


def failed_line(index: int, item_id: str | None, error: str) -> dict[str, Any]:
    """An item that has no classification: the same keys, null values, and the reason in `error`."""
    return {"index": index, **dict.fromkeys(RESULT_FIELDS), "id": item_id, "error": error}


def last_submit_progress(record: dict[str, str]) -> float:
    """When the submitter of a job last stored something, in Redis's clock (`JobStore.server_time`); records
    made before `sent_at`: their creation (in Redis's clock too, except on an earlier release's records)."""
    return float(record.get("sent_at") or record.get("created") or 0)


# The most bytes of lines `JobStore.upload` puts in one argument of a script call: Redis refuses a longer one
# (proto-max-bulk-len, 512 MB by default) and drops the connection, and a chunk of long items can be longer
# (256 items of 200,000 control characters, each escaped to six bytes: 614 MB).
MAX_ARG_BYTES = 64 << 20


def line_runs(lines: bytes, limit: int) -> list[memoryview]:
    """`lines` (each ended by b"\\n") cut after a line end into runs of at most `limit` bytes (a longer line
    is a run of its own); views of `lines`, not copies."""
    view, runs, start = memoryview(lines), [], 0
    while len(lines) - start > limit:
        cut = lines.rfind(b"\n", start, start + limit)
        if cut < 0:  # one line longer than `limit`: alone
            cut = lines.find(b"\n", start + limit)
            if cut < 0:
                break
        runs.append(view[start : cut + 1])
        start = cut + 1
    if start < len(lines):
        runs.append(view[start:])
    return runs


def new_nonce() -> str:
    """A new job's generation nonce (its record's `nonce`, carried by its chunk messages)."""
    return uuid.uuid4().hex


def reserved_until(epoch_s: str | float) -> str:
    """A tombstone's expiry (epoch seconds, Redis's clock), as a UTC time a person reads."""
    when = datetime.fromtimestamp(float(epoch_s), tz=UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise InvalidInputError(
            f"must be 1-128 characters of A-Z a-z 0-9 . _ - (first a letter or digit), got {job_id!r}",
            field="job_id",
        )
    return job_id


@dataclass(frozen=True)
class JobKeys:
    job_id: str

    @property
    def job(self) -> str:
        return f"safety:job:{{{self.job_id}}}"

    @property
    def items(self) -> str:
        return self.job + ":items"

    @property
    def results(self) -> str:
        return self.job + ":results"

    @property
    def attempts(self) -> str:
        return self.job + ":attempts"

    @property
    def errors(self) -> str:
        return self.job + ":errors"

    @property
    def enqueued(self) -> str:
        return self.job + ":enqueued"

    @property
    def submitter(self) -> str:
        """The submit lease: the token of the submit storing and queueing the job now (`hold_submit`)."""
        return self.job + ":submitter"

    @property
    def deleted(self) -> str:
        """The tombstone `delete` leaves: the id stays reserved until the deleted job would have expired."""
        return self.job + ":deleted"

    def all(self) -> list[str]:
        """Every key of the job, the record first (the order the scripts expect); not its tombstone."""
        return [self.job, self.items, self.results, self.attempts, self.errors, self.enqueued]


# Lua shared by the scripts that stamp a time on a job: now in Redis's clock (epoch seconds), so that every
# time on a record (`created`, `sent_at`, `started`, `updated`, `finished`) is stamped, and compared by the
# sweeper (`JobStore.server_time`), on one clock, never several machines'.
_NOW_LUA = """
local function redis_now()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
"""

# KEYS = JobKeys.all() + [tombstone]; ARGV = field/value pairs (`created`, `updated` and `sent_at` are
# stamped here). -> 1 when created, {'exists', digest} when the
# record exists, {'deleted', reserved until (epoch s)} when the id belongs to a deleted job (its leftover
# chunk messages and a still-running submitter must never act on a new job of the same id). A new record
# starts with no items, results, attempts, errors or sent chunks: keys left by a job whose record was lost
# (Redis restarted without persistence while it was being submitted) must not pass for this one's. The
# fields include the new job's `nonce` (`new_nonce`), so its chunk messages tell it from any other job
# that had or will have its id.
_CREATE = (
    _NOW_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists', redis.call('HGET', KEYS[1], 'digest') or ''}
end
local reserved = redis.call('GET', KEYS[7])
if reserved then return {'deleted', reserved} end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('HSET', KEYS[1], unpack(ARGV))
local now = redis_now()
redis.call('HSET', KEYS[1], 'created', now, 'updated', now, 'sent_at', now)
redis.call('EXPIRE', KEYS[1], tonumber(redis.call('HGET', KEYS[1], 'ttl_s')))
return 1
"""
)

# KEYS = [record, key]; ARGV = [kind, ...]: kind 'lines' then the index of the first item and the items'
# lines in one or more strings, each line ended by a newline (hash fields index, index + 1, ...; set in
# groups, so a chunk of any size stays within Lua's unpack limit), or 'set' then members. Adds to the job's
# items or sent chunks (which then expire with the record) only while its record exists: 0 when it is gone
# (a Redis restart without persistence in the middle of a submit), and nothing is written; 2 when the job
# was cancelled (the submitter stops; a cancelled job keeps nothing it will never run). Notes the
# submitter's progress in `sent_at` (Redis's clock) while the job is being submitted.
_ADD = (
    _NOW_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'state') == 'cancelled' then return 2 end
if ARGV[1] == 'lines' then
  local index, fields, n = tonumber(ARGV[2]), {}, 0
  for k = 3, #ARGV do
    local lines, at = ARGV[k], 1
    while at <= #lines do
      local stop = string.find(lines, '\\n', at, true) or #lines + 1
      fields[n + 1], fields[n + 2], n = tostring(index), string.sub(lines, at, stop - 1), n + 2
      index, at = index + 1, stop + 1
      if n == 1000 or (at > #lines and k == #ARGV) then
        redis.call('HSET', KEYS[2], unpack(fields, 1, n))
        n = 0
      end
    end
  end
else
  redis.call('SADD', KEYS[2], unpack(ARGV, 2))
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then redis.call('PEXPIRE', KEYS[2], pttl) end
if redis.call('HGET', KEYS[1], 'state') == 'submitting' then
  redis.call('HSET', KEYS[1], 'sent_at', redis_now())
end
return 1
"""
)

# KEYS = [submit lease]; ARGV = [token, ttl ms]. Renews the lease when the token holds it, takes it when
# nobody does. -> {1, 0} renewed (held since the last call), {2, 0} taken (it was free: whatever another
# submit did meanwhile must be read again), {0, its remaining ms} held by another token.
_HOLD_SUBMIT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, 0}
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {2, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
"""

# KEYS = [submit lease]; ARGV = [token]. Frees the lease if the token holds it. -> 1 freed, 0 not held.
_RELEASE_SUBMIT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Lua shared by the scripts below: a chunk's item range, and whether any of its items lacks a result.
_CHUNK_LUA = """
local function chunk_range(chunk, size, total)
  local lo = chunk * size
  return lo, math.min(total, lo + size)
end
local function incomplete(results, lo, hi)
  for i = lo, hi - 1 do
    if redis.call('HEXISTS', results, tostring(i)) == 0 then return true end
  end
  return false
end
"""

# Lua shared by the scripts through which a chunk message acts on its job: whether the message (its nonce,
# '' for a message of the previous release, which is not checked) belongs to another job of the same id.
_STALE_LUA = """
local function stale(job, nonce)
  return nonce ~= '' and redis.call('HGET', job, 'nonce') ~= nonce
end
"""

# KEYS = JobKeys.all(); ARGV = [chunk, nonce]. Nothing is counted or written for a stale message.
# -> {'gone'} | {'stale'} | {'cancelled'} | {'complete'} | {'run', attempt, lo, hi, last_error}
_START_CHUNK = (
    _NOW_LUA
    + _CHUNK_LUA
    + _STALE_LUA
    + """
local job = KEYS[1]
if redis.call('EXISTS', job) == 0 then return {'gone'} end
if stale(job, ARGV[2]) then return {'stale'} end
local f = redis.call('HMGET', job, 'state', 'total', 'chunk_size')
local state, total, size = f[1], tonumber(f[2]), tonumber(f[3])
if state == 'cancelled' then return {'cancelled'} end
local lo, hi = chunk_range(tonumber(ARGV[1]), size, total)
if not incomplete(KEYS[3], lo, hi) then return {'complete'} end
local attempt = redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
local pttl = redis.call('PTTL', job)
if pttl > 0 then redis.call('PEXPIRE', KEYS[4], pttl) end
if state == 'queued' then redis.call('HSET', job, 'state', 'running') end
if redis.call('HEXISTS', job, 'started') == 0 then redis.call('HSET', job, 'started', redis_now()) end
return {'run', attempt, lo, hi, redis.call('HGET', KEYS[5], ARGV[1]) or ''}
"""
)

# KEYS = [job]; ARGV = [nonce]. What a running chunk checks before each slice (nothing changes).
# -> 'gone' | 'stale' | the job's state
_CHUNK_STATE = (
    _STALE_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'gone' end
if stale(KEYS[1], ARGV[1]) then return 'stale' end
return redis.call('HGET', KEYS[1], 'state') or 'gone'
"""
)

# KEYS = JobKeys.all(); ARGV = [model, nonce, (index, json, failed 0|1)...]. First write of an index
# wins. -> {state, newly written ok, newly written failed}; state 'gone' when the job no longer exists,
# 'stale' when the writer's message belongs to another job of that id (replaced while the chunk ran).
_WRITE_RESULTS = (
    _NOW_LUA
    + _STALE_LUA
    + """
local job = KEYS[1]
if redis.call('EXISTS', job) == 0 then return {'gone', 0, 0} end
if stale(job, ARGV[2]) then return {'stale', 0, 0} end
local state = redis.call('HGET', job, 'state')
if state == 'cancelled' then return {'cancelled', 0, 0} end
local ok, bad = 0, 0
for i = 3, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) == 1 then
    if ARGV[i + 2] == '1' then bad = bad + 1 else ok = ok + 1 end
  end
end
local pttl = redis.call('PTTL', job)
if pttl > 0 then redis.call('PEXPIRE', KEYS[3], pttl) end
if ARGV[1] ~= '' and ok + bad > 0 then  -- the models whose results the job holds, ' + ' between them
  local models = redis.call('HGET', job, 'model')
  if not models then
    redis.call('HSET', job, 'model', ARGV[1])
  elseif string.find(' + ' .. models .. ' + ', ' + ' .. ARGV[1] .. ' + ', 1, true) == nil then
    redis.call('HSET', job, 'model', models .. ' + ' .. ARGV[1])
  end
end
local done = redis.call('HINCRBY', job, 'done', ok)
local failed = redis.call('HINCRBY', job, 'failed', bad)
local now = redis_now()
redis.call('HSET', job, 'updated', now)
local total = tonumber(redis.call('HGET', job, 'total'))
if done + failed >= total and state ~= 'done' and state ~= 'failed' then
  if failed >= total then state = 'failed' else state = 'done' end
  redis.call('HSET', job, 'state', state, 'finished', now)
  redis.call('DEL', KEYS[2])
  local ttl = tonumber(redis.call('HGET', job, 'ttl_s'))
  for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
end
return {state, ok, bad}
"""
)

# KEYS = JobKeys.all(). -> the state after the call, or false when the job does not exist.
_CANCEL = (
    _NOW_LUA
    + """
local job = KEYS[1]
if redis.call('EXISTS', job) == 0 then return false end
local state = redis.call('HGET', job, 'state')
if state == 'done' or state == 'failed' or state == 'cancelled' then return state end
local now = redis_now()
redis.call('HSET', job, 'state', 'cancelled', 'finished', now, 'updated', now)
local ttl = tonumber(redis.call('HGET', job, 'ttl_s'))
for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
return 'cancelled'
"""
)

# KEYS = JobKeys.all() + [tombstone]. Deletes every key of a finished or cancelled job and leaves its
# tombstone (with the record's remaining TTL; its value: until when, in Redis's clock, epoch seconds), so the
# id cannot be reused while the deleted job's chunk messages may still be queued. The open list is in another
# Redis Cluster slot: `JobStore.delete` removes the id from it after this script.
# -> {'deleted', record field/value...} | {'open', state} (not deleted) | {'gone'}
_DELETE = """
local record = redis.call('HGETALL', KEYS[1])
if #record == 0 then return {'gone'} end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'done' and state ~= 'failed' and state ~= 'cancelled' then return {'open', state} end
local pttl = redis.call('PTTL', KEYS[1])
if pttl <= 0 then pttl = 1000 * tonumber(redis.call('HGET', KEYS[1], 'ttl_s')) end
local t = redis.call('TIME')
local reserved = tonumber(t[1]) + math.ceil(pttl / 1000)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('SET', KEYS[7], tostring(reserved), 'PX', pttl)
table.insert(record, 1, 'deleted')
return record
"""

# KEYS = [job]. A resumed submit: notes its progress (`sent_at`, Redis's clock) if the job is still
# 'submitting', so the sweeper does not take it for stopped between the resume and its first upload.
# -> the record, field/value pairs (empty when the job is gone).
_RESUME = (
    _NOW_LUA
    + """
if redis.call('HGET', KEYS[1], 'state') == 'submitting' then
  redis.call('HSET', KEYS[1], 'sent_at', redis_now())
end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS = [job]. A fully enqueued job leaves 'submitting'.
_SEAL = """
if redis.call('HGET', KEYS[1], 'state') == 'submitting' then
  if redis.call('HEXISTS', KEYS[1], 'started') == 1 then
    redis.call('HSET', KEYS[1], 'state', 'running')
  else
    redis.call('HSET', KEYS[1], 'state', 'queued')
  end
end
return redis.call('HGET', KEYS[1], 'state')
"""


# KEYS = JobKeys.all(); ARGV = [chunk, message, dead 0|1, nonce]. Never recreates a vanished job, never
# notes an error on another job of the same id.
_NOTE = (
    _STALE_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if stale(KEYS[1], ARGV[4]) then return 0 end
redis.call('HSET', KEYS[5], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[5], math.max(1, redis.call('PTTL', KEYS[1])))
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'error', 'chunk ' .. ARGV[1] .. ': ' .. ARGV[2]) end
return 1
"""
)


# KEYS = JobKeys.all(); ARGV = [chunk, nonce]. Uncount a delivery of the chunk (never below 0), only while the
# job exists and, given the message's nonce, is the message's job. -> 1 when uncounted, else 0.
_GIVE_BACK = (
    _STALE_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if stale(KEYS[1], ARGV[2]) then return 0 end
if tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0') <= 0 then return 0 end
redis.call('HINCRBY', KEYS[4], ARGV[1], -1)
return 1
"""
)


# KEYS = [job, items, results]; ARGV = [lo, hi]. One read of a cancelled job's gap: whether its record exists
# (and its nonce), with the results and the stored items of indices lo..hi-1, so that an item missing from
# both means "never stored" only for the same job whose record is there (a deleted, expired or lost job loses
# its items with its record; the script sees all of them at one instant).
# -> {'gone'} | {'ok', nonce ('' for a record of the previous release), {result or false...}, {item...}}
_GAP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local fields = {}
for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do fields[#fields + 1] = tostring(i) end
if #fields == 0 then return {'ok', redis.call('HGET', KEYS[1], 'nonce') or '', {}, {}} end
return {'ok', redis.call('HGET', KEYS[1], 'nonce') or '', redis.call('HMGET', KEYS[3], unpack(fields)),
        redis.call('HMGET', KEYS[2], unpack(fields))}
"""
GAP_MAX = 4096  # indices per `gap` call (Lua's unpack takes a few thousand values)


# KEYS = [ACTIVE_JOBS]; ARGV = [job id]. Appends the id unless it is there (a resumed submit).
_OPEN = """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then redis.call('RPUSH', KEYS[1], ARGV[1]) end
"""


# KEYS = JobKeys.all(). -> the enqueued chunks that still miss a result for at least one of their items.
_INCOMPLETE = (
    _CHUNK_LUA
    + """
local f = redis.call('HMGET', KEYS[1], 'total', 'chunk_size')
local total, size = tonumber(f[1]), tonumber(f[2])
if not total or not size then return {} end
local out = {}
for _, c in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  if incomplete(KEYS[3], chunk_range(tonumber(c), size, total)) then table.insert(out, tonumber(c)) end
end
return out
"""
)


@dataclass(frozen=True)
class ChunkStart:
    """What a delivery of a chunk should do: `action` is run, or (nothing to do) complete, cancelled, gone or
    stale (the message belongs to another job of the same id)."""

    action: str
    attempt: int = 0
    lo: int = 0
    hi: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class Written:
    state: str  # the job's state after the write ('gone': it no longer exists; 'stale': another job's now)
    ok: int  # results newly written
    failed: int  # failed-item records newly written


class JobStore:
    """Typed access to a job's keys over one `redis.Redis` client (decode_responses=True)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._create = client.register_script(_CREATE)
        self._add = client.register_script(_ADD)
        self._start = client.register_script(_START_CHUNK)
        self._write = client.register_script(_WRITE_RESULTS)
        self._chunk_state = client.register_script(_CHUNK_STATE)
        self._cancel = client.register_script(_CANCEL)
        self._seal = client.register_script(_SEAL)
        self._resume = client.register_script(_RESUME)
        self._note = client.register_script(_NOTE)
        self._give_back = client.register_script(_GIVE_BACK)
        self._incomplete = client.register_script(_INCOMPLETE)
        self._open = client.register_script(_OPEN)
        self._delete = client.register_script(_DELETE)
        self._hold_submit = client.register_script(_HOLD_SUBMIT)
        self._release_submit = client.register_script(_RELEASE_SUBMIT)
        self._gap = client.register_script(_GAP)

    @classmethod
    def for_worker(cls, url: str) -> JobStore:
        """A store on a connection of a worker process's own (a chunk task's, the sweeper's): long-lived, so
        a connection idle for 25 s is health-checked before it is used again."""
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=30, health_check_interval=25
        )
        return cls(client)

    # ---- the job client's side -----------------------------------------------------------------------------
    def create(self, job_id: str, record: dict[str, Any]) -> str | None:
        """Create the job record (with its TTL) unless it exists: None when created, else its digest.
        InvalidInputError (field job_id) when the id is a deleted job's, still reserved."""
        keys = JobKeys(job_id)
        argv = [str(x) for kv in record.items() for x in kv]
        out = self._create(keys=[*keys.all(), keys.deleted], args=argv)
        if out == 1:
            return None
        if out[0] == "deleted":
            raise InvalidInputError(
                f"job {job_id!r} was deleted; its id stays reserved until {reserved_until(out[1])} "
                "(when the deleted job would have expired) — use a new id",
                field="job_id",
            )
        return str(out[1])

    def get(self, job_id: str) -> dict[str, str] | None:
        record = self.client.hgetall(JobKeys(job_id).job)
        return record or None

    def resume(self, job_id: str) -> dict[str, str] | None:
        """The record of a job a submit resumes (None when it is gone), its progress noted if it is still
        `submitting`: the resume counts as the submitter's progress."""
        out = self._resume(keys=[JobKeys(job_id).job])
        return dict(zip(out[::2], out[1::2], strict=True)) or None

    def deleted_until(self, job_id: str) -> str | None:
        """For a deleted job whose id is still reserved: until when (UTC, readable); else None."""
        until = self.client.get(JobKeys(job_id).deleted)
        return None if until is None else reserved_until(until)

    def upload(self, job_id: str, first: int, lines: bytes) -> bool:
        """Store items `first`, `first + 1`, ...: their JSON as UTF-8 lines in one bytes object, each ended by
        b"\\n" (none may hold a newline of its own: a canonical JSON line never does), sent as a few arguments
        (`line_runs`) instead of two per item. False (nothing stored) when the job was cancelled,
        NotFoundError when the job record is gone."""
        keys = JobKeys(job_id)
        args = ["lines", first, *line_runs(lines, MAX_ARG_BYTES)]
        return self._added(job_id, self._add(keys=[keys.job, keys.items], args=args))

    def hold_submit(self, job_id: str, token: str, ttl_s: float) -> tuple[str, float]:
        """Take or renew the job's submit lease for `token`, for `ttl_s` from now: ("renewed", 0) when the
        token held it since its last call; ("taken", 0) when it was free (another submit may have stored and
        queued chunks since this token last held it); ("busy", seconds the other holder's lease has left)
        when another token holds it (nothing changed)."""
        ttl_ms = max(1, round(ttl_s * 1000))
        outcome, left_ms = self._hold_submit(keys=[JobKeys(job_id).submitter], args=[token, ttl_ms])
        state = {1: "renewed", 2: "taken"}.get(int(outcome), "busy")
        return state, max(0, int(left_ms)) / 1000

    def release_submit(self, job_id: str, token: str) -> bool:
        """Free the job's submit lease if `token` holds it (not one another submit took after it expired)."""
        return bool(self._release_submit(keys=[JobKeys(job_id).submitter], args=[token]))

    def enqueued(self, job_id: str) -> set[int]:
        return {int(c) for c in self.client.smembers(JobKeys(job_id).enqueued)}

    def mark_enqueued(self, job_id: str, chunk: int) -> bool:
        """Record that `chunk` was sent; False when the job was cancelled, NotFoundError when it is gone."""
        keys = JobKeys(job_id)
        args = ["set", chunk]
        return self._added(job_id, self._add(keys=[keys.job, keys.enqueued], args=args))

    @staticmethod
    def _added(job_id: str, out: int) -> bool:
        if out == 2:  # cancelled
            return False
        if not out:
            raise NotFoundError(
                f"job {job_id!r} disappeared while it was being submitted (deleted, or Redis restarted "
                "without persistence?); submit it again"
            )
        return True

    def mark_active(self, job_id: str) -> None:
        self._open(keys=[ACTIVE_JOBS], args=[job_id])

    def active(self) -> list[str]:
        return sorted(self.client.lrange(ACTIVE_JOBS, 0, -1))

    def forget_active(self, job_id: str) -> None:
        self.client.lrem(ACTIVE_JOBS, 0, job_id)

    def incomplete_chunks(self, job_id: str) -> list[int]:
        """Enqueued chunks with at least one item still without a result (ascending)."""
        return sorted(int(c) for c in self._incomplete(keys=JobKeys(job_id).all()))

    def server_time(self) -> float:
        """Now in Redis's clock (epoch seconds): the clock every time on a record is stamped in, whatever
        this host's."""
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def stalled_submission(self, job_id: str, now: float | None = None) -> tuple[int, int, float] | None:
        """For a job still `submitting` whose submitter stored nothing for SUBMIT_STALL_S: (items queued,
        chunks queued, seconds since its last progress); else None. `now` defaults to Redis's clock."""
        record = self.get(job_id)
        if record is None or record.get("state") != "submitting":
            return None
        idle = (self.server_time() if now is None else now) - last_submit_progress(record)
        if idle < SUBMIT_STALL_S:
            return None
        size, total = int(record["chunk_size"]), int(record["total"])
        chunks = self.enqueued(job_id)
        return sum(min(size, total - c * size) for c in chunks), len(chunks), idle

    def seal(self, job_id: str) -> str | None:
        return self._seal(keys=[JobKeys(job_id).job])

    def results(self, job_id: str, lo: int, hi: int) -> list[str | None]:
        if hi <= lo:
            return []
        return self.client.hmget(JobKeys(job_id).results, [str(i) for i in range(lo, hi)])

    def items(self, job_id: str, indices: Iterable[int]) -> list[dict[str, str] | None]:
        raw = self.client.hmget(JobKeys(job_id).items, [str(i) for i in indices])
        return [None if r is None else json.loads(r) for r in raw]

    def gap(
        self, job_id: str, lo: int, hi: int
    ) -> tuple[str, list[str | None], list[dict[str, str] | None]] | None:
        """For items lo..hi-1 (at most GAP_MAX) of a cancelled job, read at one instant: (the record's nonce,
        their results, their stored items), None when the record is gone."""
        if hi - lo > GAP_MAX:
            raise ValueError(f"gap of {hi - lo} items, more than {GAP_MAX}")
        keys = JobKeys(job_id)
        out = self._gap(keys=[keys.job, keys.items, keys.results], args=[lo, hi])
        if out[0] == "gone":
            return None
        items = [None if raw is None else json.loads(raw) for raw in out[3]]
        return str(out[1]), list(out[2]), items

    def cancel(self, job_id: str) -> str | None:
        return self._cancel(keys=JobKeys(job_id).all())

    def delete(self, job_id: str) -> tuple[str, dict[str, str] | None]:
        """Delete every key of a finished or cancelled job, leave its tombstone (the id stays reserved for
        the job's remaining TTL), and drop its entry in the open list: ("deleted", the record as it was);
        ("open", {"state": ...}) when it is not finished (nothing deleted); ("gone", None) when there is no
        such job."""
        keys = JobKeys(job_id)
        out = self._delete(keys=[*keys.all(), keys.deleted])
        if out[0] == "gone":
            return "gone", None
        if out[0] == "open":
            return "open", {"state": out[1]}
        # The open list is another slot in Redis Cluster, so not in the script. No resubmit can slip in
        # between and lose its entry: the tombstone refuses the id.
        self.forget_active(job_id)
        return "deleted", dict(zip(out[1::2], out[2::2], strict=True))

    def ttls(self, job_id: str) -> dict[str, int]:
        """Seconds to live of every existing key of the job (-1: no TTL)."""
        keys = [k for k in JobKeys(job_id).all() if self.client.exists(k)]
        return {k: self.client.ttl(k) for k in keys}

    # ---- the worker's side ---------------------------------------------------------------------------------
    def start_chunk(self, job_id: str, chunk: int, nonce: str | None = None) -> ChunkStart:
        """Count a delivery of the chunk and say what to do. `nonce`: the message's (None: a message of the
        previous release, not checked)."""
        out = self._start(keys=JobKeys(job_id).all(), args=[chunk, nonce or ""])
        if out[0] != "run":
            return ChunkStart(action=out[0])
        return ChunkStart("run", attempt=int(out[1]), lo=int(out[2]), hi=int(out[3]), last_error=out[4])

    def chunk_state(self, job_id: str, nonce: str | None = None) -> str:
        """The job's state as a chunk message (`nonce`: its; None: not checked) sees it, in one read: 'gone'
        (deleted or expired), 'stale' (another job of the id now) or the record's state ('cancelled', ...)."""
        return str(self._chunk_state(keys=[JobKeys(job_id).job], args=[nonce or ""]))

    def write(
        self,
        job_id: str,
        records: Sequence[tuple[int, str, bool]],
        *,
        model: str = "",
        nonce: str | None = None,
    ) -> Written:
        """Write (index, result JSON, failed?) records; indices already written keep their first result.
        Nothing is written when `nonce` (the chunk message's; None: not checked) is not the job's."""
        argv: list[str] = [model, nonce or ""]
        for index, payload, failed in records:
            argv += [str(index), payload, "1" if failed else "0"]
        state, ok, bad = self._write(keys=JobKeys(job_id).all(), args=argv)
        return Written(state=state, ok=int(ok), failed=int(bad))

    def record_error(
        self, job_id: str, chunk: int, message: str, *, dead: bool = False, nonce: str | None = None
    ) -> bool:
        """Remember a chunk's last error (and on the job record, when `dead`), only while the job exists and,
        given the message's `nonce`, is the message's job. -> whether it was noted."""
        args = [chunk, message, "1" if dead else "0", nonce or ""]
        return bool(self._note(keys=JobKeys(job_id).all(), args=args))

    def give_back_attempt(self, job_id: str, chunk: int, nonce: str | None = None) -> bool:
        """Uncount a delivery `start_chunk` counted (one Redis cut off: not the chunk's fault), only while the
        job exists and, given the message's `nonce`, is the message's job. -> whether it was."""
        return bool(self._give_back(keys=JobKeys(job_id).all(), args=[chunk, nonce or ""]))

    def dead_letter(
        self, job_id: str, chunk: int, attempts: int, error: str, nonce: str | None = None
    ) -> bool:
        """Dead-letter a chunk: its error on the job record, then an entry in the dead-letter list; neither
        for a job that is gone or, given the message's `nonce`, is another job of that id. -> whether it was
        dead-lettered. (The list is in another Redis Cluster slot than the job, so the two writes are not
        one script: a failure between them leaves the job's error without its list entry.)"""
        if not self.record_error(job_id, chunk, error, dead=True, nonce=nonce):
            return False
        entry = json.dumps(
            {"job_id": job_id, "chunk": chunk, "attempts": attempts, "error": error, "at": self.server_time()}
        )
        pipe = self.client.pipeline(transaction=True)
        pipe.lpush(DEAD_LETTER, entry)
        pipe.ltrim(DEAD_LETTER, 0, DEAD_LETTER_MAX - 1)
        pipe.execute()
        return True

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        if limit <= 0:  # LRANGE 0 -1 would be the whole list
            return []
        return [json.loads(e) for e in self.client.lrange(DEAD_LETTER, 0, limit - 1)]
