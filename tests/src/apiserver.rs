//! An in-process Kubernetes API double: a real HTTP server on 127.0.0.1:0
//! that records every request and answers the calls berth makes with real
//! API objects (built from k8s-openapi types): Node reads and patches (JSON
//! patches and merge patches applied to the Nodes it holds), and creates of
//! `events.k8s.io/v1` Events, which it keeps like the API server does (name,
//! namespace checked, uid and resourceVersion set). Faults can be queued:
//! the next N matching requests get a given status code and a `Status` body.
//!
//! It lives in the tests crate, not in `agent/tests`: the tests crate
//! depends on the agent, so the agent cannot take it as a dev-dependency
//! without linking a second copy of itself; the capacity-publishing suite
//! moved here with it (tests/tests/publish.rs).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::{Node, NodeStatus, NodeSystemInfo};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// One request as the double saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// The status code the double answered with.
    pub answered: u16,
}

impl Seen {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body of {} {} is not JSON: {e}", self.method, self.path))
    }
}

struct Fault {
    method: Method,
    path: String,
    code: u16,
    times: usize,
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, Value>,
    /// Created Events, in order.
    events: Vec<Value>,
    seen: Vec<Seen>,
    faults: Vec<Fault>,
}

pub struct Double {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Double {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A Node as a kubelet registers it, optionally with berth's resource and in-use annotation.
pub fn node(name: &str, arch: &str, slots: Option<u64>, in_use: Option<u64>) -> Node {
    let q = |s: &str| Quantity(s.to_string());
    let mut capacity = BTreeMap::from([
        ("cpu".to_string(), q("8")),
        ("memory".to_string(), q("32Gi")),
        ("pods".to_string(), q("110")),
    ]);
    if let Some(s) = slots {
        capacity.insert("berth.dev/build".into(), q(&s.to_string()));
    }
    let mut annotations = BTreeMap::from([("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string())]);
    if let Some(u) = in_use {
        annotations.insert("berth.dev/builds-in-use".into(), u.to_string());
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            resource_version: Some("1".into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/arch".to_string(), arch.to_string()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
                ("kubernetes.io/hostname".to_string(), name.to_string()),
            ])),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: None,
        status: Some(NodeStatus {
            allocatable: Some(capacity.clone()),
            capacity: Some(capacity),
            node_info: Some(NodeSystemInfo {
                architecture: arch.into(),
                operating_system: "linux".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn reason(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "Unknown",
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Applies RFC 6902 `add`/`replace`/`remove` ops (what berth sends) to `doc`.
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let kind = op["op"].as_str().ok_or("op without \"op\"")?;
        let path = op["path"].as_str().ok_or("op without \"path\"")?;
        let tokens: Vec<String> =
            path.strip_prefix('/').ok_or("path must start with /")?.split('/').map(unescape).collect();
        let (last, parents) = tokens.split_last().ok_or("empty path")?;
        let mut at = &mut *doc;
        for t in parents {
            at = at.get_mut(t.as_str()).ok_or_else(|| format!("doc is missing path: {path:?}"))?;
        }
        let obj = at.as_object_mut().ok_or_else(|| format!("parent of {path:?} is not an object"))?;
        match kind {
            "add" => {
                obj.insert(last.clone(), op["value"].clone());
            }
            "replace" if obj.contains_key(last) => {
                obj.insert(last.clone(), op["value"].clone());
            }
            "remove" if obj.remove(last).is_some() => {}
            _ => return Err(format!("cannot {kind} {path:?}")),
        }
    }
    Ok(())
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn bump_version(node: &mut Value) {
    let rv = node["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    node["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
}

impl Inner {
    /// POST of an `events.k8s.io/v1` Event, checked as the API server checks
    /// what berth relies on: JSON, the path's namespace, a name, the fields
    /// the v1 API requires of a new Event, and no duplicate name.
    fn create_event(&mut self, method: &Method, ns: &str, content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
        if method != Method::POST {
            return (405, status(405, "MethodNotAllowed", &format!("{method} on events is not served by the double")));
        }
        if content_type != Some("application/json") {
            return (415, status(415, "UnsupportedMediaType", &format!("unsupported content type {content_type:?}")));
        }
        let Ok(mut ev) = serde_json::from_slice::<Value>(body) else {
            return (400, status(400, "BadRequest", "body is not JSON"));
        };
        if ev["apiVersion"] != "events.k8s.io/v1" || ev["kind"] != "Event" {
            return (400, status(400, "BadRequest", "expected apiVersion events.k8s.io/v1, kind Event"));
        }
        if ev["metadata"]["namespace"].as_str().is_some_and(|n| n != ns) {
            return (400, status(400, "BadRequest", "the namespace of the object does not match the request"));
        }
        let Some(name) = ev["metadata"]["name"].as_str().map(str::to_string) else {
            return (422, status(422, "Invalid", "metadata.name: Required value"));
        };
        let missing: Vec<&str> = ["eventTime", "reportingController", "reportingInstance", "action", "reason", "type"]
            .into_iter()
            .filter(|f| ev[*f].as_str().is_none_or(str::is_empty))
            .collect();
        if !missing.is_empty() {
            return (422, status(422, "Invalid", &format!("{missing:?}: Required value")));
        }
        if self.events.iter().any(|e| e["metadata"]["namespace"] == ns && e["metadata"]["name"] == name.as_str()) {
            return (409, status(409, "AlreadyExists", &format!("events.events.k8s.io \"{name}\" already exists")));
        }
        ev["metadata"]["namespace"] = json!(ns);
        ev["metadata"]["uid"] = json!(format!("event-uid-{}", self.events.len()));
        ev["metadata"]["resourceVersion"] = json!((1000 + self.events.len()).to_string());
        self.events.push(ev.clone());
        (201, ev)
    }

    fn answer(&mut self, method: &Method, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
        if let Some(f) = self.faults.iter_mut().find(|f| f.times > 0 && f.method == method && f.path == path) {
            f.times -= 1;
            let code = f.code;
            return (code, status(code, reason(code), &format!("injected fault {code}")));
        }
        if let Some(ns) =
            path.strip_prefix("/apis/events.k8s.io/v1/namespaces/").and_then(|r| r.strip_suffix("/events"))
        {
            return self.create_event(method, ns, content_type, body);
        }
        let rest = path.strip_prefix("/api/v1/nodes").unwrap_or("?");
        let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        match (method.clone(), parts.as_slice()) {
            (Method::GET, []) if rest.is_empty() || rest == "/" => {
                let items: Vec<Value> = self.nodes.values().cloned().collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "100"}, "items": items}),
                )
            }
            (Method::GET, [name]) => match self.nodes.get(*name) {
                Some(n) => (200, n.clone()),
                None => (404, status(404, "NotFound", &format!("nodes \"{name}\" not found"))),
            },
            (Method::PATCH, [name, rest @ ..]) if rest.is_empty() || rest == ["status"] => {
                let subresource = !rest.is_empty();
                let Some(node) = self.nodes.get_mut(*name) else {
                    return (404, status(404, "NotFound", &format!("nodes \"{name}\" not found")));
                };
                let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                    return (400, status(400, "BadRequest", "body is not JSON"));
                };
                let mut updated = node.clone();
                match content_type {
                    Some("application/json-patch+json") => {
                        if let Err(e) = json_patch(&mut updated, &patch) {
                            return (422, status(422, "Invalid", &e));
                        }
                    }
                    Some("application/merge-patch+json") => merge_patch(&mut updated, &patch),
                    other => {
                        return (
                            415,
                            status(415, "UnsupportedMediaType", &format!("unsupported content type {other:?}")),
                        )
                    }
                }
                // Like the API server: the main resource ignores status, the status subresource ignores the rest.
                if subresource {
                    let new_status = updated["status"].clone();
                    updated = node.clone();
                    updated["status"] = new_status;
                } else {
                    updated["status"] = node["status"].clone();
                }
                bump_version(&mut updated);
                *node = updated.clone();
                (200, updated)
            }
            _ => (
                404,
                status(404, "NotFound", &format!("the server could not find the requested resource ({method} {path})")),
            ),
        }
    }
}

impl Double {
    /// Serves `nodes` on 127.0.0.1:<ephemeral>.
    pub async fn start(nodes: Vec<Node>) -> Double {
        let inner = Arc::new(Mutex::new(Inner {
            nodes: nodes
                .into_iter()
                .map(|n| (n.metadata.name.clone().unwrap(), serde_json::to_value(&n).unwrap()))
                .collect(),
            ..Default::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = inner.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                            let content_type =
                                parts.headers.get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
                            let path = parts.uri.path().to_string();
                            let mut inner = state.lock().unwrap();
                            let (code, answer) = inner.answer(&parts.method, &path, content_type.as_deref(), &body);
                            inner.seen.push(Seen {
                                method: parts.method.to_string(),
                                path,
                                query: parts.uri.query().unwrap_or("").to_string(),
                                content_type,
                                body,
                                answered: code,
                            });
                            let resp = Response::builder()
                                .status(StatusCode::from_u16(code).unwrap())
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Double { addr, inner, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for the double (plain HTTP, no credentials), set up as the agent sets up its own.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        berth_agent::publish::client_from(config, std::time::Duration::from_secs(5)).unwrap()
    }

    /// The next `times` `method` requests to `path` get `code`.
    pub fn fail(&self, method: Method, path: &str, code: u16, times: usize) {
        self.inner.lock().unwrap().faults.push(Fault { method, path: path.into(), code, times });
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }

    pub fn seen_at(&self, method: &str, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.method == method && s.path == path).collect()
    }

    /// The Events created so far, in order.
    pub fn events(&self) -> Vec<Event> {
        let all = self.inner.lock().unwrap().events.clone();
        all.into_iter().map(|e| serde_json::from_value(e).expect("a stored Event parses")).collect()
    }

    pub fn node(&self, name: &str) -> Node {
        serde_json::from_value(self.inner.lock().unwrap().nodes[name].clone()).unwrap()
    }

    /// A kubeconfig file that points at the double.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: nobody\ncurrent-context: double\nusers:\n- name: nobody\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}
