//! A first end-to-end check that the harness and the binary agree.
mod common;
use common::*;
use serde_json::json;

#[test]
fn ready_line_health_and_a_confirmed_forward() {
    let p = Proxy::start(&[]);
    let r = p.http("GET", "/healthz", None, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    let ta = p.register("alice");
    let tb = p.register("bob");
    let (mut a, _) = p.online(&ta, json!({}));
    let (mut b, _) = p.online(&tb, json!({}));
    a.send(&json!({"jsonrpc": "2.0", "id": 1, "method": "federation/send", "params": {"to": "bob", "message": {"x": 1}}}));
    let d = b.recv_method("federation/deliver");
    assert_eq!(d["params"]["from"], "alice");
    b.answer(&d, json!({"ok": true}));
    let r = a.recv_id(&json!(1));
    assert_eq!(r["result"]["status"], "delivered");
    assert_eq!(r["result"]["reply"], json!({"ok": true}));
}
