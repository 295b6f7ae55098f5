"""moto's server, with DynamoDB's semantics for conditional PartiQL writes in BatchExecuteStatement.

moto 5.2.5 (py-partiql-parser 0.6.3) runs PartiQL UPDATE with equality-only WHERE clauses and
no existence check, and INSERT without parameters or duplicate check. DynamoDB documents both:
an UPDATE whose WHERE clause matches no item answers ConditionalCheckFailed, an INSERT of an
existing key answers DuplicateItem, and each statement of a batch has its own answer. Fleetline
writes device state that way (shared/src/adapters/aws/devices.rs), so without this the moto
contract could not check it.

This translates those two statement forms into moto's own UpdateItem / PutItem with the
equivalent condition expression, so moto stores the items and evaluates the conditions:
  UPDATE "t" SET "a" = ? [SET ...] [REMOVE "b" ...] WHERE "k" = ? [AND "k2" = ?] [AND "x" <op> ?]...
  INSERT INTO "t" VALUE {'a': ?, 'b': 'text', ...}
Values are parameters (?), 'strings' or numbers; <op> is one of = <> < <= > >=. Any other
statement is left to moto as before. Each request runs under one lock, so a condition and its
write are atomic, as in DynamoDB. IoT certificate ids are SHA-256 of the DER, as AWS gives them.

IoT Jobs' control plane (shared/src/adapters/aws/jobs.rs) gets AWS's behaviour back where moto
5.2.5 departs from it, each under the same lock:
  - CreateJob of a job id that exists answers ResourceAlreadyExistsException (409): AWS never
    reuses a job id; moto replaced the job. More than 100 targets is InvalidRequest, AWS's limit
    (moto took any number), so a test shows a larger job goes through a thing group.
  - A thing-group target gives each thing in the group an execution (a SNAPSHOT of its
    members); an unknown group is ResourceNotFound. moto made one execution named after the
    group. A new job is IN_PROGRESS, as on AWS (moto said QUEUED, not a job status).
  - DescribeJob's jobProcessDetails counts the job's executions by status (moto answered a
    constant), and a job in progress none of whose executions is QUEUED or IN_PROGRESS is
    COMPLETED (moto's jobs never completed).
  - CancelJob cancels the QUEUED executions, and with force the IN_PROGRESS ones too (moto
    left them as they were); a job no longer in progress is left as it is; an unknown job is
    ResourceNotFound (moto failed with a 500).

Connections are kept alive between requests, as AWS's endpoints keep them: werkzeug's server,
which moto runs, answers every request with `Connection: close` because http.server cannot
drain a body the application left unread. Here the body is read whole before moto sees it,
so the connection can carry the next request; an SDK client then pays one TCP connect per
connection instead of one per request, as against AWS. A chunked request body keeps
werkzeug's close.
Usage: python scripts/moto_server.py -H 127.0.0.1 -p PORT
"""

import inspect
import io
import os
import re
import sys
import threading

from moto.core.exceptions import JsonRESTError
from moto.dynamodb.exceptions import ConditionalCheckFailed
from moto.dynamodb.models import DynamoDBBackend
from moto.core.utils import utcnow
from moto.iot.exceptions import (
    InvalidRequestException,
    ResourceAlreadyExistsException,
    ResourceNotFoundException,
)
from moto.iot.models import FakeJobExecution, IoTBackend
from moto.iotdata.models import IoTDataPlaneBackend
import moto.server
from moto.moto_server.werkzeug_app import MotoRequestHandler
from moto.server import main
from werkzeug.serving import WSGIRequestHandler
from moto import settings

TOKEN = re.compile(r"""\s*(?:"(?P<ident>[^"]*)"|'(?P<text>[^']*)'|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><>|<=|>=|[=<>{}:,?])|(?P<word>[A-Za-z_][A-Za-z0-9_]*))""")


class Unsupported(Exception):
    """Not one of the two forms handled here: moto's own parser takes the statement."""


def tokens(statement):
    out, pos = [], 0
    statement = statement.strip()
    while pos < len(statement):
        m = TOKEN.match(statement, pos)
        if not m or m.end() == pos:
            raise Unsupported(statement[pos:])
        kind = m.lastgroup
        value = m.group(kind)
        out.append((kind, value.upper() if kind == "word" else value))
        pos = m.end()
    return out


class Statement:
    def __init__(self, statement, parameters):
        self.toks = tokens(statement)
        self.params = list(parameters)
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self, kind=None, value=None):
        k, v = self.peek()
        if k is None or (kind and k != kind) or (value and v != value):
            raise Unsupported(f"expected {value or kind}, got {v!r}")
        self.i += 1
        return v

    def name(self):
        k, v = self.peek()
        if k not in ("ident", "word"):
            raise Unsupported(f"expected a name, got {v!r}")
        self.i += 1
        return v

    def value(self):
        k, v = self.peek()
        self.i += 1
        if k == "op" and v == "?":
            if not self.params:
                raise Unsupported("fewer parameters than placeholders")
            return self.params.pop(0)
        if k == "text":
            return {"S": v}
        if k == "num":
            return {"N": v}
        raise Unsupported(f"expected a value, got {v!r}")

    def done(self):
        if self.i != len(self.toks) or self.params:
            raise Unsupported("trailing tokens or parameters")


class Expression:
    """Builds expression attribute names and values."""

    def __init__(self):
        self.names, self.values = {}, {}

    def name(self, n):
        key = f"#n{len(self.names)}"
        self.names[key] = n
        return key

    def value(self, v):
        key = f":v{len(self.values)}"
        self.values[key] = v
        return key


def key_names(backend, table_name):
    table = backend.get_table(table_name)
    return [k for k in (table.hash_key_attr, table.range_key_attr) if k]


def run_update(backend, st):
    st.take("word", "UPDATE")
    table = st.name()
    expr, sets, removes = Expression(), [], []
    while st.peek() in (("word", "SET"), ("word", "REMOVE")):
        action = st.take("word")
        attr = expr.name(st.name())
        if action == "SET":
            st.take("op", "=")
            sets.append(f"{attr} = {expr.value(st.value())}")
        else:
            removes.append(attr)
    st.take("word", "WHERE")
    terms = []
    while True:
        attr = st.name()
        op = st.take("op")
        if op not in ("=", "<>", "<", "<=", ">", ">="):
            raise Unsupported(op)
        terms.append((attr, op, st.value()))
        if st.peek() != ("word", "AND"):
            break
        st.take("word", "AND")
    st.done()
    keys = key_names(backend, table)
    key = {attr: v for attr, op, v in terms if op == "=" and attr in keys}
    if sorted(key) != sorted(keys):
        raise Unsupported("the WHERE clause must name the whole primary key")
    # DynamoDB's implicit condition: the item exists. Then the rest of the WHERE clause.
    conditions = [f"attribute_exists({expr.name(keys[0])})"] + [
        f"{expr.name(attr)} {op} {expr.value(v)}" for attr, op, v in terms if not (op == "=" and attr in keys)
    ]
    update = " ".join(p for p in ("SET " + ", ".join(sets) if sets else "", "REMOVE " + ", ".join(removes) if removes else "") if p)
    try:
        backend.update_item(
            table, key, update, expr.names, expr.values, condition_expression=" AND ".join(conditions)
        )
    except ConditionalCheckFailed:
        return {"TableName": table, "Error": {"Code": "ConditionalCheckFailed", "Message": "The conditional request failed"}}
    return {"TableName": table}


def run_insert(backend, st):
    st.take("word", "INSERT")
    st.take("word", "INTO")
    table = st.name()
    st.take("word", "VALUE")
    st.take("op", "{")
    item = {}
    while True:
        attr = st.take("text")
        st.take("op", ":")
        item[attr] = st.value()
        if st.peek() != ("op", ","):
            break
        st.take("op", ",")
    st.take("op", "}")
    st.done()
    expr = Expression()
    condition = f"attribute_not_exists({expr.name(key_names(backend, table)[0])})"
    try:
        backend.put_item(table, item, condition_expression=condition, expression_attribute_names=expr.names)
    except ConditionalCheckFailed:
        return {"TableName": table, "Error": {"Code": "DuplicateItem", "Message": "Duplicate primary key exists in table"}}
    return {"TableName": table}


moto_batch_execute_statement = DynamoDBBackend.batch_execute_statement

# moto's server handles requests on threads and its condition check and write are separate
# steps; DynamoDB applies each conditional write atomically. One lock makes these atomic.
LOCK = threading.RLock()


def batch_execute_statement(self, statements):
    with LOCK:
        return run_statements(self, statements)


def run_statements(self, statements):
    responses = []
    for stmt in statements:
        text = stmt["Statement"].lstrip()
        run = run_update if text[:6].upper() == "UPDATE" else run_insert if text[:6].upper() == "INSERT" else None
        try:
            if run is None:
                raise Unsupported("not an UPDATE or INSERT")
            responses.append(run(self, Statement(text, stmt.get("Parameters", []))))
        except Unsupported:
            responses.extend(moto_batch_execute_statement(self, [stmt]))
        except JsonRESTError as e:  # e.g. a missing table, an invalid update
            code = e.relative_error_type.removesuffix("Exception")
            responses.append({"Error": {"Code": code, "Message": e.message}})
    return responses


DynamoDBBackend.batch_execute_statement = batch_execute_statement

# The same for the Device Shadow service: AWS checks an update's version and writes it as one
# step (a 409 otherwise); moto reads and writes in separate steps on its request threads.
moto_update_thing_shadow = IoTDataPlaneBackend.update_thing_shadow
moto_delete_thing_shadow = IoTDataPlaneBackend.delete_thing_shadow


def update_thing_shadow(self, *args, **kwargs):
    with LOCK:
        return moto_update_thing_shadow(self, *args, **kwargs)


def delete_thing_shadow(self, *args, **kwargs):
    with LOCK:
        return moto_delete_thing_shadow(self, *args, **kwargs)


IoTDataPlaneBackend.update_thing_shadow = update_thing_shadow

# And for DynamoDB's single-item conditional writes (PutItem, UpdateItem, DeleteItem with a
# condition), which moto also checks and writes in two steps.
def atomic(method):
    def locked(self, *args, **kwargs):
        with LOCK:
            return method(self, *args, **kwargs)

    return locked


DynamoDBBackend.put_item = atomic(DynamoDBBackend.put_item)
DynamoDBBackend.update_item = atomic(DynamoDBBackend.update_item)
DynamoDBBackend.delete_item = atomic(DynamoDBBackend.delete_item)
IoTDataPlaneBackend.delete_thing_shadow = delete_thing_shadow

# AWS IoT gives a certificate the SHA-256 of its DER as its id; moto hashes the PEM text unless
# told to read real certificates (the reconciliation matches ids with parsed PEMs).
settings.default_user_config.setdefault("iot", {})["use_valid_cert"] = True

# IoT Jobs (see the docstring): one execution per target thing, thing groups expanded, counts
# and completion from the executions, cancel applied to them.
moto_create_job = IoTBackend.create_job
moto_describe_job = IoTBackend.describe_job
MAX_JOB_TARGETS = 100
PENDING = ("QUEUED", "IN_PROGRESS")
COUNTED = {
    "QUEUED": "numberOfQueuedThings",
    "IN_PROGRESS": "numberOfInProgressThings",
    "SUCCEEDED": "numberOfSucceededThings",
    "FAILED": "numberOfFailedThings",
    "REJECTED": "numberOfRejectedThings",
    "TIMED_OUT": "numberOfTimedOutThings",
    "CANCELED": "numberOfCanceledThings",
    "REMOVED": "numberOfRemovedThings",
}


def executions_of(backend, job_id):
    return [e for (j, _), e in backend.job_executions.items() if j == job_id]


def create_job(self, job_id, targets, **kwargs):
    with LOCK:
        if job_id in self.jobs:
            job = self.jobs[job_id]
            raise ResourceAlreadyExistsException(f"Job {job_id} already exists", job_id, job.job_arn)
        if len(targets) > MAX_JOB_TARGETS:
            raise InvalidRequestException(f"A job has at most {MAX_JOB_TARGETS} targets")
        groups = [t for t in targets if ":thinggroup/" in t]
        for arn in groups:
            if arn not in self.thing_groups:
                raise ResourceNotFoundException(f"Thing group {arn} does not exist")
        result = moto_create_job(self, job_id=job_id, targets=targets, **kwargs)
        self.jobs[job_id].status = "IN_PROGRESS"
        for arn in groups:
            self.job_executions.pop((job_id, arn.split("/")[-1]), None)
            for thing in list(self.thing_groups[arn].things.values()):
                key = (job_id, thing.thing_name)
                if key not in self.job_executions:
                    self.job_executions[key] = FakeJobExecution(job_id, thing.arn)
        return result


def settle(backend, job):
    """Count the job's executions; complete it once none is pending."""
    statuses = [e.status for e in executions_of(backend, job.job_id)]
    details = {name: 0 for name in COUNTED.values()}
    for status in statuses:
        details[COUNTED[status]] += 1
    job.job_process_details = details
    if job.status == "IN_PROGRESS" and not any(s in PENDING for s in statuses):
        job.status = "COMPLETED"
        job.completed_at = job.last_updated_at = utcnow()


def describe_job(self, job_id):
    with LOCK:
        job = moto_describe_job(self, job_id)
        settle(self, job)
        return job


def cancel_job(self, job_id, reason_code, comment, force):
    with LOCK:
        job = self.jobs.get(job_id)
        if job is None:
            raise ResourceNotFoundException(f"Job {job_id} does not exist")
        settle(self, job)
        if job.status != "IN_PROGRESS":
            return job
        cancelled = PENDING if force else ("QUEUED",)
        now = utcnow()
        for execution in executions_of(self, job_id):
            if execution.status in cancelled:
                execution.force_canceled = execution.status == "IN_PROGRESS"
                execution.status = "CANCELED"
                execution.last_updated_at = now
        job.status, job.force, job.last_updated_at = "CANCELED", bool(force), now
        job.reason_code = reason_code if reason_code is not None else job.reason_code
        job.comment = comment if comment is not None else job.comment
        settle(self, job)
        return job


IoTBackend.create_job = create_job
IoTBackend.describe_job = describe_job
IoTBackend.cancel_job = cancel_job

# A descriptor that is always readable and always at its end: werkzeug's drain, below.
DRAINED, _writer = os.pipe()
os.close(_writer)


class KeepAliveHandler(MotoRequestHandler):
    """moto's request handler with HTTP/1.1 keep-alive. Each request's body is read whole (by
    its Content-Length) before the application runs, so the socket stands at the next request
    line whatever moto reads, and the `Connection: close` werkzeug always sends is left out.
    werkzeug then "drains" the socket after every response, waiting 10 ms for stray bytes and
    reading to the end of the stream, which on a kept connection would swallow (and wait for)
    the next request: for that drain the handler shows it an empty stream. A chunked body is
    left to werkzeug as it is, connection close included."""

    keep_alive = False
    # werkzeug writes a response's head and body separately: with Nagle's algorithm the body
    # would wait for the client's delayed ACK of the head, 40 ms a response on a kept connection.
    disable_nagle_algorithm = True

    def make_environ(self):
        environ = super().make_environ()
        if not environ.get("wsgi.input_terminated"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            environ["wsgi.input"] = io.BytesIO(self.rfile.read(length) if length > 0 else b"")
            self.keep_alive = True
            self.kept = (self.rfile, self.connection)
            self.rfile, self.connection = io.BytesIO(), DRAINED
        return environ

    def run_wsgi(self):
        try:
            super().run_wsgi()
        finally:
            if self.keep_alive:
                self.rfile, self.connection = self.kept
                self.keep_alive = False

    def send_header(self, keyword, value):
        if keyword.lower() == "connection" and value.lower() == "close" and self.keep_alive:
            return
        super().send_header(keyword, value)


# The handler leans on how werkzeug (pinned in requirements-test.txt) closes and drains: with
# another werkzeug whose code differs, keep werkzeug's own behaviour (one request a connection).
_werkzeug_run_wsgi = inspect.getsource(WSGIRequestHandler.run_wsgi)
if "selector.register(self.connection" in _werkzeug_run_wsgi and '"Connection", "close"' in _werkzeug_run_wsgi:
    moto.server.MotoRequestHandler = KeepAliveHandler
else:
    print("moto_server.py: this werkzeug drains differently; connections are not kept alive", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
