//! The AWS IoT rule SQL subset the local rules engine evaluates.
//!
//! Supported (anything else fails at start-up, naming the rule and the construct):
//! - `SELECT *`, field paths (`a.b.c`), literals, and functions `topic()`, `topic(n)`,
//!   `timestamp()`, `clientid()`, each optionally `AS alias`, separated by commas;
//! - `FROM 'topic/filter'` with `+` (one level) and `#` (the rest) wildcards;
//! - `WHERE` with `=`, `<>`, `!=`, `<`, `<=`, `>`, `>=`, `AND`, `OR`, `NOT` and parentheses.
//!
//! Semantics follow IoT Core: a path that is not in the payload is *undefined* and its
//! output field is omitted; a comparison with an undefined or mismatched operand is not
//! true; later output fields replace earlier ones of the same name (`SELECT *, topic(3) AS thing`).
//! `clientid()` is undefined when the broker cannot attribute the publish to a client.

use std::fmt;

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unsupported or invalid rule SQL: {construct} (at character {at})")]
pub struct SqlError {
    pub construct: String,
    pub at: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Sym(&'static str),
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "{s}"),
            Tok::Str(s) => write!(f, "'{s}'"),
            Tok::Num(n) => write!(f, "{n}"),
            Tok::Sym(s) => write!(f, "{s}"),
        }
    }
}

const SYMBOLS: [&str; 14] = ["<>", "!=", "<=", ">=", "=", "<", ">", "(", ")", ",", ".", "*", "+", "-"];

fn tokenize(sql: &str) -> Result<Vec<(usize, Tok)>, SqlError> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'\'' {
            let start = i;
            i += 1;
            let mut s = String::new();
            loop {
                match b.get(i) {
                    None => return Err(SqlError { construct: "unterminated string".into(), at: start }),
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                        s.push('\'');
                        i += 2;
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => {
                        let ch = sql[i..].chars().next().expect("in bounds");
                        s.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            out.push((start, Tok::Str(s)));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            let n =
                sql[start..i].parse().map_err(|_| SqlError { construct: sql[start..i].into(), at: start })?;
            out.push((start, Tok::Num(n)));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((start, Tok::Ident(sql[start..i].to_owned())));
        } else if let Some(sym) = SYMBOLS.iter().find(|s| sql[i..].starts_with(**s)) {
            out.push((i, Tok::Sym(sym)));
            i += sym.len();
        } else {
            let ch = sql[i..].chars().next().expect("in bounds");
            return Err(SqlError { construct: format!("character {ch:?}"), at: i });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value),
    Path(Vec<String>),
    Topic(Option<usize>),
    Timestamp,
    ClientId,
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Cmp(Box<Expr>, &'static str, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Star,
    Expr { expr: Expr, name: String },
}

/// A parsed rule statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub select: Vec<Item>,
    pub from: String,
    pub filter: Option<Expr>,
}

/// What a publish looks like to the rules engine.
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a Value,
    pub client_id: Option<&'a str>,
    pub now_ms: i64,
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
}

fn is_kw(t: &Tok, kw: &str) -> bool {
    matches!(t, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
}

const RESERVED: [&str; 7] = ["SELECT", "FROM", "WHERE", "AS", "AND", "OR", "NOT"];

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.len, |(a, _)| *a)
    }

    fn err<T>(&self, construct: impl Into<String>) -> Result<T, SqlError> {
        Err(SqlError { construct: construct.into(), at: self.at() })
    }

    fn unexpected<T>(&self, wanted: &str) -> Result<T, SqlError> {
        match self.peek() {
            Some(t) => self.err(format!("`{t}` where {wanted} was expected")),
            None => self.err(format!("end of statement where {wanted} was expected")),
        }
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.peek().is_some_and(|t| is_kw(t, kw)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_sym(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn statement(&mut self) -> Result<Statement, SqlError> {
        if !self.eat_kw("SELECT") {
            return self.unexpected("SELECT");
        }
        if self.peek().is_some_and(|t| is_kw(t, "VALUE") || is_kw(t, "DISTINCT")) {
            return self.err(format!("SELECT {}", self.peek().map(ToString::to_string).unwrap_or_default()));
        }
        let mut select = vec![self.item()?];
        while self.eat_sym(",") {
            select.push(self.item()?);
        }
        if !self.eat_kw("FROM") {
            return self.unexpected("FROM");
        }
        let from = match self.peek().cloned() {
            Some(Tok::Str(s)) => {
                self.pos += 1;
                s
            }
            _ => return self.unexpected("a quoted topic filter"),
        };
        let filter = if self.eat_kw("WHERE") { Some(self.or()?) } else { None };
        if self.peek().is_some() {
            return self.unexpected("end of statement");
        }
        Ok(Statement { select, from, filter })
    }

    fn item(&mut self) -> Result<Item, SqlError> {
        if self.eat_sym("*") {
            return Ok(Item::Star);
        }
        let expr = self.primary()?;
        let name = if self.eat_kw("AS") {
            match self.peek().cloned() {
                Some(Tok::Ident(a)) if !RESERVED.iter().any(|r| a.eq_ignore_ascii_case(r)) => {
                    self.pos += 1;
                    a
                }
                _ => return self.unexpected("an alias"),
            }
        } else {
            match &expr {
                Expr::Path(p) => p.last().cloned().unwrap_or_default(),
                Expr::Topic(_) => "topic".into(),
                Expr::Timestamp => "timestamp".into(),
                Expr::ClientId => "clientid".into(),
                _ => return self.err("a literal without an alias"),
            }
        };
        Ok(Item::Expr { expr, name })
    }

    fn or(&mut self) -> Result<Expr, SqlError> {
        let mut e = self.and()?;
        while self.eat_kw("OR") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, SqlError> {
        let mut e = self.not()?;
        while self.eat_kw("AND") {
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, SqlError> {
        if self.eat_kw("NOT") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        let left = self.primary()?;
        for op in ["=", "<>", "!=", "<=", ">=", "<", ">"] {
            if self.eat_sym(op) {
                let op = if op == "!=" { "<>" } else { op };
                let op: &'static str =
                    ["=", "<>", "<=", ">=", "<", ">"].into_iter().find(|o| *o == op).expect("known");
                return Ok(Expr::Cmp(Box::new(left), op, Box::new(self.primary()?)));
            }
        }
        Ok(left)
    }

    fn primary(&mut self) -> Result<Expr, SqlError> {
        let Some(tok) = self.peek().cloned() else { return self.unexpected("an expression") };
        match tok {
            Tok::Str(s) => {
                self.pos += 1;
                Ok(Expr::Literal(Value::String(s)))
            }
            Tok::Num(n) => {
                self.pos += 1;
                Ok(Expr::Literal(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)))
            }
            Tok::Sym("-") => {
                self.pos += 1;
                match self.peek().cloned() {
                    Some(Tok::Num(n)) => {
                        self.pos += 1;
                        Ok(Expr::Literal(serde_json::Number::from_f64(-n).map_or(Value::Null, Value::Number)))
                    }
                    _ => self.err("arithmetic operator `-`"),
                }
            }
            Tok::Sym("(") => {
                self.pos += 1;
                let e = self.or()?;
                if !self.eat_sym(")") {
                    return self.unexpected("`)`");
                }
                Ok(e)
            }
            Tok::Ident(name) if RESERVED.iter().any(|r| name.eq_ignore_ascii_case(r)) => {
                self.unexpected("an expression")
            }
            Tok::Ident(name) => {
                let at = self.at();
                self.pos += 1;
                if self.eat_sym("(") {
                    return self.function(&name, at);
                }
                match name.to_ascii_lowercase().as_str() {
                    "true" => return Ok(Expr::Literal(Value::Bool(true))),
                    "false" => return Ok(Expr::Literal(Value::Bool(false))),
                    "null" => return Ok(Expr::Literal(Value::Null)),
                    "case" => return self.err("CASE"),
                    _ => {}
                }
                let mut path = vec![name];
                while self.eat_sym(".") {
                    match self.peek().cloned() {
                        Some(Tok::Ident(seg)) => {
                            self.pos += 1;
                            path.push(seg);
                        }
                        _ => return self.unexpected("a field name"),
                    }
                }
                Ok(Expr::Path(path))
            }
            Tok::Sym(s) if ["+", "*"].contains(&s) => self.err(format!("arithmetic operator `{s}`")),
            _ => self.unexpected("an expression"),
        }
    }

    fn function(&mut self, name: &str, at: usize) -> Result<Expr, SqlError> {
        let e = match name.to_ascii_lowercase().as_str() {
            "topic" => match self.peek().cloned() {
                Some(Tok::Num(n)) if n >= 1.0 && n.fract() == 0.0 => {
                    self.pos += 1;
                    Expr::Topic(Some(n as usize))
                }
                Some(Tok::Sym(")")) => Expr::Topic(None),
                _ => return self.unexpected("a segment number (1, 2, ...)"),
            },
            "timestamp" => Expr::Timestamp,
            "clientid" => Expr::ClientId,
            other => return Err(SqlError { construct: format!("function {other}()"), at }),
        };
        if !self.eat_sym(")") {
            return self.unexpected("`)`");
        }
        Ok(e)
    }
}

pub fn parse(sql: &str) -> Result<Statement, SqlError> {
    let toks = tokenize(sql)?;
    let mut p = Parser { toks, pos: 0, len: sql.len() };
    p.statement()
}

/// MQTT topic filter matching with `+` and `#`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(seg)) if f == seg => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

fn eval(e: &Expr, m: &Message<'_>) -> Option<Value> {
    match e {
        Expr::Literal(v) => Some(v.clone()),
        Expr::Path(p) => {
            let mut v = m.payload;
            for seg in p {
                v = v.get(seg)?;
            }
            Some(v.clone())
        }
        Expr::Topic(None) => Some(Value::String(m.topic.to_owned())),
        Expr::Topic(Some(n)) => m.topic.split('/').nth(n - 1).map(|s| Value::String(s.to_owned())),
        Expr::Timestamp => Some(Value::from(m.now_ms)),
        Expr::ClientId => m.client_id.map(|c| Value::String(c.to_owned())),
        Expr::Not(x) => Some(Value::Bool(!truthy(eval(x, m)))),
        Expr::And(a, b) => Some(Value::Bool(truthy(eval(a, m)) && truthy(eval(b, m)))),
        Expr::Or(a, b) => Some(Value::Bool(truthy(eval(a, m)) || truthy(eval(b, m)))),
        Expr::Cmp(a, op, b) => {
            let ord = match (eval(a, m)?, eval(b, m)?) {
                (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?)?,
                (Value::String(x), Value::String(y)) => x.cmp(&y),
                (Value::Bool(x), Value::Bool(y)) if matches!(*op, "=" | "<>") => x.cmp(&y),
                _ => return None,
            };
            use std::cmp::Ordering::*;
            Some(Value::Bool(match *op {
                "=" => ord == Equal,
                "<>" => ord != Equal,
                "<" => ord == Less,
                "<=" => ord != Greater,
                ">" => ord == Greater,
                _ => ord != Less,
            }))
        }
    }
}

fn truthy(v: Option<Value>) -> bool {
    v == Some(Value::Bool(true))
}

impl Statement {
    /// The rule's output for one publish, or `None` when the topic or WHERE does not match.
    pub fn apply(&self, m: &Message<'_>) -> Option<Map<String, Value>> {
        if !topic_matches(&self.from, m.topic) {
            return None;
        }
        if let Some(f) = &self.filter {
            if !truthy(eval(f, m)) {
                return None;
            }
        }
        let mut out = Map::new();
        for item in &self.select {
            match item {
                Item::Star => {
                    if let Value::Object(o) = m.payload {
                        out.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                Item::Expr { expr, name } => {
                    if let Some(v) = eval(expr, m) {
                        out.insert(name.clone(), v);
                    }
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TELEMETRY: &str = "SELECT *, topic(3) AS thing, timestamp() AS rx_ms, clientid() AS client_id FROM 'dt/fleet/+/telemetry'";

    fn msg<'a>(topic: &'a str, payload: &'a Value, client_id: Option<&'a str>) -> Message<'a> {
        Message { topic, payload, client_id, now_ms: 1_764_000_000_000 }
    }

    #[test]
    fn evaluates_the_telemetry_rule_of_the_template() -> Result<(), SqlError> {
        let s = parse(TELEMETRY)?;
        let payload = json!({"v":1,"seq":3,"thing":"spoofed"});
        let out =
            s.apply(&msg("dt/fleet/sensor-001/telemetry", &payload, Some("sensor-001"))).expect("matches");
        assert_eq!(
            Value::Object(out),
            json!({"v":1,"seq":3,"thing":"sensor-001","rx_ms":1_764_000_000_000_i64,"client_id":"sensor-001"})
        );
        assert!(s.apply(&msg("dt/fleet/sensor-001/other", &payload, None)).is_none());
        assert!(s.apply(&msg("dt/fleet/a/b/telemetry", &payload, None)).is_none());
        Ok(())
    }

    #[test]
    fn omits_undefined_values() -> Result<(), SqlError> {
        let s = parse(TELEMETRY)?;
        let out = s.apply(&msg("dt/fleet/x/telemetry", &json!({"a":1}), None)).expect("matches");
        assert!(!out.contains_key("client_id"));
        let s = parse("SELECT a.b.c AS deep, missing FROM '#'")?;
        let out = s.apply(&msg("t", &json!({"a":{"b":{"c":5}}}), None)).expect("matches");
        assert_eq!(Value::Object(out), json!({"deep":5}));
        Ok(())
    }

    #[test]
    fn filters_with_where_comparisons_and_logic() -> Result<(), SqlError> {
        let s = parse("SELECT * FROM 'dt/#' WHERE (bat < 20 AND NOT test = true) OR fw <> '1.4.2'")?;
        let hit = |p: Value| s.apply(&msg("dt/fleet/x/telemetry", &p, None)).is_some();
        assert!(hit(json!({"bat":10,"test":false,"fw":"1.4.2"})));
        assert!(!hit(json!({"bat":10,"test":true,"fw":"1.4.2"})));
        assert!(hit(json!({"bat":90,"fw":"2.0"})));
        assert!(!hit(json!({"bat":90,"fw":"1.4.2"})));
        assert!(!hit(json!({"bat":"low","fw":"1.4.2"})), "mismatched types are not true");
        let s = parse("select * from 'a/+' where x >= -1.5 and y != 'q'")?;
        assert!(s.apply(&msg("a/b", &json!({"x":-1.5,"y":"z"}), None)).is_some());
        Ok(())
    }

    #[test]
    fn matches_topic_filters() {
        assert!(topic_matches("dt/fleet/+/telemetry", "dt/fleet/a/telemetry"));
        assert!(topic_matches("dt/#", "dt/fleet/a/telemetry"));
        assert!(topic_matches("#", "x"));
        assert!(!topic_matches("dt/fleet/+", "dt/fleet/a/telemetry"));
        assert!(!topic_matches("dt/fleet/+/telemetry", "dt/fleet/telemetry"));
    }

    #[test]
    fn rejects_unsupported_constructs_naming_them() {
        for (sql, construct) in [
            ("SELECT VALUE state FROM 'a'", "SELECT VALUE"),
            ("SELECT get(x, 1) AS y FROM 'a'", "function get()"),
            ("SELECT a + 1 AS y FROM 'a'", "`+`"),
            ("SELECT * FROM 'a' WHERE CASE", "CASE"),
            ("SELECT * FROM 'a' LIMIT 5", "`LIMIT`"),
            ("SELECT * FROM a", "a quoted topic filter"),
            ("SELECT * FROM 'a' WHERE x = 1 ;", "character ';'"),
            ("SELECT 'lit' FROM 'a'", "a literal without an alias"),
            ("SELECT * FROM 'a", "unterminated string"),
        ] {
            let err = parse(sql).expect_err(sql);
            assert!(err.construct.contains(construct), "{sql}: {err}");
        }
    }
}
