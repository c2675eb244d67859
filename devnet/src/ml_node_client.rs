//! The ML-node client as a network node writes its requests: upstream's dapi
//! (gonka-ai/gonka `312044d`, `decentralized-api/mlnodeclient` over `utils/http.go`) sends Go's
//! net/http bytes: `Host`, `User-Agent: Go-http-client/1.1`, `Content-Length` (`0` for a POST
//! without body), `Accept-Encoding: gzip`, in that order and case, and **no `Content-Type`** on
//! its JSON bodies. `protocol/tests/fixtures/ml-node-requests-2025/` holds those bytes as Go
//! wrote them; a test here checks this client writes the same.
//!
//! The 2025 client reads the status and body of its GETs and ignores the status of its POSTs;
//! [`Answer`] keeps both so callers can do either.

use std::time::Duration;

use http::{Method, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use gonka_protocol::ml_node::{InferenceUpRequest, StateResponse};
use gonka_protocol::pow::{InitRequest, PowStatus, ProofBatch};

/// What an ML node answered.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Answer(format!("unreadable answer: {e}")))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad ML-node URL {0}")]
    Url(String),
    #[error("ML node unreachable: {0}")]
    Unreachable(String),
    #[error("ML node answered HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    Answer(String),
}

/// One ML node's management API (`pocUrl`: `http://host:port[/vX.Y.Z][poc_segment]`).
#[derive(Clone, Debug)]
pub struct MlNodeClient {
    authority: String,
    prefix: String,
    timeout: Duration,
}

impl MlNodeClient {
    pub fn new(poc_url: &str) -> Result<Self, ClientError> {
        let uri: Uri = poc_url.parse().map_err(|_| ClientError::Url(poc_url.into()))?;
        let authority = uri.authority().ok_or_else(|| ClientError::Url(poc_url.into()))?.to_string();
        if uri.scheme_str() != Some("http") {
            return Err(ClientError::Url(poc_url.into()));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Self { authority, prefix, timeout: Duration::from_secs(60) })
    }

    /// A GET as `utils.SendGetRequest` sends it.
    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.send(Method::GET, path, None).await
    }

    /// A POST as `utils.SendPostJsonRequest` sends it: the JSON of `payload`, or no body.
    pub async fn post<T: Serialize>(&self, path: &str, payload: Option<&T>) -> Result<Answer, ClientError> {
        let body = payload.map(|p| Bytes::from(serde_json::to_vec(p).expect("serializes")));
        self.send(Method::POST, path, Some(body.unwrap_or_default())).await
    }

    async fn send(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<Answer, ClientError> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| ClientError::Unreachable(format!("no answer within {:?}", self.timeout)))?
    }

    async fn exchange(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<Answer, ClientError> {
        let unreachable = |e: &dyn std::fmt::Display| ClientError::Unreachable(format!("{}: {e}", self.authority));
        let stream = tokio::net::TcpStream::connect(&self.authority).await.map_err(|e| unreachable(&e))?;
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
        tokio::spawn(connection);
        // Go's order: Host, User-Agent, the body's length (POST and PUT always), then the
        // transport's Accept-Encoding.
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(header::HOST, &self.authority)
            .header(header::USER_AGENT, "Go-http-client/1.1");
        if let Some(body) = &body {
            request = request.header(header::CONTENT_LENGTH, body.len());
        }
        let request = request
            .header(header::ACCEPT_ENCODING, "gzip")
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::Url(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| unreachable(&e))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| unreachable(&e))?.to_bytes();
        Ok(Answer { status, body })
    }

    /// A GET whose answer upstream decodes only on 200.
    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let answer = self.get(path).await?;
        if answer.status != 200 {
            return Err(ClientError::Status(answer.status));
        }
        answer.json()
    }

    /// `GET /api/v1/state`.
    pub async fn state(&self) -> Result<StateResponse, ClientError> {
        self.get_json("/api/v1/state").await
    }

    /// `GET /api/v1/pow/status`.
    pub async fn pow_status(&self) -> Result<PowStatus, ClientError> {
        self.get_json("/api/v1/pow/status").await
    }

    /// `POST /api/v1/stop`, no body.
    pub async fn stop(&self) -> Result<Answer, ClientError> {
        self.post::<()>("/api/v1/stop", None).await
    }

    /// `POST /api/v1/pow/init/generate`.
    pub async fn init_generate(&self, dto: &InitRequest) -> Result<Answer, ClientError> {
        self.post("/api/v1/pow/init/generate", Some(dto)).await
    }

    /// `POST /api/v1/pow/init/validate`.
    pub async fn init_validate(&self, dto: &InitRequest) -> Result<Answer, ClientError> {
        self.post("/api/v1/pow/init/validate", Some(dto)).await
    }

    /// `POST /api/v1/pow/validate`: a sample of another ML node's proofs. Upstream's sample
    /// (`ProofBatch.SampleNoncesToValidate`) drops the prover's number: `node_id` is 0.
    pub async fn validate_batch(&self, sample: &ProofBatch) -> Result<Answer, ClientError> {
        self.post("/api/v1/pow/validate", Some(sample)).await
    }

    /// `POST /api/v1/inference/up` with the 2025 dtype.
    pub async fn inference_up(&self, model: &str, args: &[String]) -> Result<Answer, ClientError> {
        let dto = InferenceUpRequest { model: model.into(), dtype: "float16".into(), additional_args: args.to_vec() };
        self.post("/api/v1/inference/up", Some(&dto)).await
    }

    /// `POST /api/v1/inference/up` as the 2026 network node sends it (`dtype: "auto"`).
    pub async fn inference_up_auto(&self, model: &str, args: &[String]) -> Result<Answer, ClientError> {
        let dto = InferenceUpRequest { model: model.into(), dtype: "auto".into(), additional_args: args.to_vec() };
        self.post("/api/v1/inference/up", Some(&dto)).await
    }

    /// `GET /api/v1/inference/pow/status` (2026 `GetPowStatusV2`).
    pub async fn pow_status_v2(&self) -> Result<gonka_protocol::pow_v2::StatusResponse, ClientError> {
        self.get_json("/api/v1/inference/pow/status").await
    }

    /// `POST /api/v1/inference/pow/init/generate` (2026 `InitGenerateV2`).
    pub async fn init_generate_v2(&self, dto: &serde_json::Value) -> Result<Answer, ClientError> {
        self.post("/api/v1/inference/pow/init/generate", Some(dto)).await
    }

    /// `POST /api/v1/inference/pow/generate` (2026 `GenerateV2`: validation samples).
    pub async fn generate_v2(&self, dto: &serde_json::Value) -> Result<Answer, ClientError> {
        self.post("/api/v1/inference/pow/generate", Some(dto)).await
    }

    /// `POST /api/v1/inference/pow/stop` with `{}` (2026 `StopPowV2`).
    pub async fn stop_pow_v2(&self) -> Result<Answer, ClientError> {
        self.post("/api/v1/inference/pow/stop", Some(&serde_json::json!({}))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gonka_protocol::pow::Params;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn fixture(name: &str) -> String {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../protocol/tests/fixtures/ml-node-requests-2025/");
        std::fs::read_to_string(format!("{dir}{name}")).unwrap()
    }

    /// Accepts one request, answers `{}`, returns the request's bytes.
    async fn capture(send: impl AsyncFnOnce(MlNodeClient)) -> (String, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.parse::<usize>().unwrap());
                    if body.len() >= length {
                        break;
                    }
                }
            }
            socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await.unwrap();
            String::from_utf8(raw).unwrap()
        });
        send(MlNodeClient::new(&format!("http://{host}")).unwrap()).await;
        (server.await.unwrap(), host)
    }

    fn split(raw: &str) -> (&str, serde_json::Value) {
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head, if body.is_empty() { serde_json::Value::Null } else { serde_json::from_str(body).unwrap() })
    }

    /// Head byte for byte, body the same JSON in the same key order (Go writes `1e-05` as
    /// `0.00001` and integral floats without `.0`; JSON readers see the same numbers).
    fn assert_like_go(ours: &str, host: &str, go_fixture: &str) {
        let go = go_fixture.replace("{host}", host).replace("{callback}", "127.0.0.1:9100");
        let ((our_head, our_body), (go_head, go_body)) = (split(ours), split(&go));
        let our_len = our_head.lines().find_map(|l| l.strip_prefix("Content-Length: "));
        let go_len = go_head.lines().find_map(|l| l.strip_prefix("Content-Length: "));
        assert_eq!(our_len.is_some(), go_len.is_some(), "Content-Length presence");
        let strip = |h: &str| h.lines().filter(|l| !l.starts_with("Content-Length: ")).collect::<Vec<_>>().join("\n");
        assert_eq!(strip(our_head), strip(go_head));
        let keys = |v: &serde_json::Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(keys(&our_body), keys(&go_body), "key order");
        assert_eq!(numbers_as_f64(our_body), numbers_as_f64(go_body));
    }

    /// Go marshals `rope_theta` as an int, we as a float: the same number to a JSON reader.
    fn numbers_as_f64(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
            Value::Array(a) => Value::Array(a.into_iter().map(numbers_as_f64).collect()),
            Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, numbers_as_f64(v))).collect()),
            other => other,
        }
    }

    #[tokio::test]
    async fn requests_are_written_as_gos_net_http_writes_them() {
        let (raw, host) = capture(async |c| drop(c.state().await)).await;
        assert_eq!(raw, fixture("state.http").replace("{host}", &host));
        let (raw, host) = capture(async |c| drop(c.stop().await)).await;
        assert_eq!(raw, fixture("stop.http").replace("{host}", &host));
        let (raw, host) = capture(async |c| {
            drop(c.inference_up("Qwen/Qwen2.5-7B-Instruct", &["--quantization".into(), "fp8".into()]).await)
        })
        .await;
        assert_like_go(&raw, &host, &fixture("inference_up.http"));

        let params: Params = serde_json::from_value(serde_json::json!({"dim": 64, "n_layers": 2, "n_heads": 4,
            "n_kv_heads": 4, "vocab_size": 96, "ffn_dim_multiplier": 1.3, "multiple_of": 32, "norm_eps": 1e-5,
            "rope_theta": 10000.0, "use_scaled_rope": false, "seq_len": 8}))
        .unwrap();
        let dto = InitRequest {
            block_hash: "0xblockhash".into(),
            block_height: 1000,
            public_key: "gonka-pubkey".into(),
            batch_size: 100,
            r_target: 1.4013564660458173,
            fraud_threshold: 1e-7,
            params,
            node_id: 1,
            node_count: 2,
            url: "http://127.0.0.1:9100/v1/poc-batches".into(),
        };
        let (raw, host) = capture(async |c| drop(c.init_generate(&dto).await)).await;
        assert_like_go(&raw, &host, &fixture("pow_init_generate.http"));
        let sample = ProofBatch {
            public_key: "gonka-pubkey".into(),
            block_hash: "0xblockhash".into(),
            block_height: 1000,
            nonces: vec![7, 9],
            dist: vec![1.2, 1.3],
            node_id: 0,
        };
        let (raw, host) = capture(async |c| drop(c.validate_batch(&sample).await)).await;
        assert_like_go(&raw, &host, &fixture("pow_validate.http"));
    }
}
