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
write are atomic, as in DynamoDB. IoT certificate ids are SHA-256 of the DER, as AWS gives them. Usage: python scripts/moto_server.py -H 127.0.0.1 -p PORT
"""

import re
import sys
import threading

from moto.core.exceptions import JsonRESTError
from moto.dynamodb.exceptions import ConditionalCheckFailed
from moto.dynamodb.models import DynamoDBBackend
from moto.iotdata.models import IoTDataPlaneBackend
from moto.server import main
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

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
