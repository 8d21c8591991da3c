//! Answers in the shapes IMDS and the original agent used, which every SDK parses: a token with every
//! field a JSON string, errors as `{"error", "error_description"}`.

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use std::sync::{Arc, Mutex};

use hyper::body::Bytes;

use crate::{cache::Tokens, upstream::Token};

/// One token as IMDS sends it: every field a string (the Rust SDK refuses a numeric `expires_on`; MSAL
/// needs `expires_in`; Python reads `resource`), keys in alphabetical order as IMDS and the original
/// sent them. Serialised straight from the cached token, without copying it: this is every cached
/// answer's cost.
#[derive(serde::Serialize)]
struct TokenBody<'a> {
    access_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    #[serde(serialize_with = "as_string")]
    expires_in: i64,
    #[serde(serialize_with = "as_string")]
    expires_on: i64,
    #[serde(serialize_with = "as_string")]
    ext_expires_in: i64,
    #[serde(serialize_with = "as_string")]
    not_before: i64,
    refresh_token: &'static str,
    resource: &'a str,
    token_type: &'static str,
}

impl<'a> TokenBody<'a> {
    /// The body of `token` for `resource`, its lifetime counted from `now` (Unix seconds).
    fn new(token: &'a Token, resource: &'a str, now: i64) -> Self {
        let expires_in = (token.expires_on - now).max(0);
        Self {
            access_token: &token.access_token,
            client_id: token.client_id.as_deref(),
            expires_in,
            expires_on: token.expires_on,
            ext_expires_in: expires_in,
            not_before: token.not_before,
            refresh_token: "",
            resource,
            token_type: "Bearer",
        }
    }
}

fn as_string<S: serde::Serializer>(value: &i64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// The JSON of one token, as a value to embed in another answer (`/host/token`).
pub fn token_json(token: &Token, resource: &str, now: i64) -> Value {
    serde_json::to_value(TokenBody::new(token, resource, now)).unwrap_or(Value::Null)
}

/// The answer to a token request written afresh ([`Written::tokens`] is what the endpoint sends).
#[cfg(test)]
fn tokens(tokens: &[Token], resource: &str, now: i64) -> Response {
    match token_body(tokens, resource, now) {
        Some(body) => json_bytes(StatusCode::OK, body),
        None => tokens_unencodable(),
    }
}

/// The body of a token answer: one token as an object; for a multi-tenant service principal a list, the
/// primary tenant's first, as the original answered.
fn token_body(tokens: &[Token], resource: &str, now: i64) -> Option<Vec<u8>> {
    // Sized for the tokens and the other fields, so that the body is written without growing.
    let capacity = tokens
        .iter()
        .map(|t| t.access_token.len() + resource.len() + 256)
        .sum();
    let mut bytes = Vec::with_capacity(capacity);
    let written = match tokens {
        [single] => serde_json::to_writer(&mut bytes, &TokenBody::new(single, resource, now)),
        many => {
            let bodies: Vec<TokenBody<'_>> = many.iter().map(|t| TokenBody::new(t, resource, now)).collect();
            serde_json::to_writer(&mut bytes, &bodies)
        }
    };
    written.ok().map(|()| bytes)
}

/// Strings and integers always serialise; this is only what the type system cannot know.
fn tokens_unencodable() -> Response {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "could not encode the token",
    )
}

/// Token answers written in the current second, each with the cached tokens it was written from: the
/// answer to a cached token changes only with the second (`expires_in` counts whole seconds), so every
/// request for it in the same second is sent the same bytes, written once. Entries of past seconds go
/// when a new answer is written; holding the tokens keeps their address from naming other tokens while
/// an entry is kept.
#[derive(Debug, Default)]
pub struct Written {
    entries: Mutex<foldhash::HashMap<usize, WrittenEntry>>,
}

#[derive(Debug)]
struct WrittenEntry {
    tokens: Tokens,
    resource: String,
    second: i64,
    body: Bytes,
}

impl Written {
    /// The answer to a token request for `tokens`, sent again from what was written for
    /// the same tokens, resource and second, if any.
    pub fn tokens(&self, tokens: &Tokens, resource: &str, now: i64) -> Response {
        let key = Arc::as_ptr(tokens) as usize;
        let written = self.lock().get(&key).and_then(|entry| {
            (Arc::ptr_eq(&entry.tokens, tokens) && entry.second == now && entry.resource == resource)
                .then(|| entry.body.clone())
        });
        if let Some(body) = written {
            return json_body(StatusCode::OK, Body::from(body));
        }
        let Some(body) = token_body(tokens, resource, now) else {
            return tokens_unencodable();
        };
        let body = Bytes::from(body);
        let mut entries = self.lock();
        entries.retain(|_, entry| entry.second == now);
        entries.insert(
            key,
            WrittenEntry {
                tokens: tokens.clone(),
                resource: resource.to_owned(),
                second: now,
                body: body.clone(),
            },
        );
        drop(entries);
        json_body(StatusCode::OK, Body::from(body))
    }

    /// Answers kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<usize, WrittenEntry>> {
        // Entries are whole values: a panic elsewhere cannot leave one half-written.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An error in IMDS's shape.
pub fn error(status: StatusCode, code: &str, description: &str) -> Response {
    json_response(status, &json!({"error": code, "error_description": description}))
}

/// 400 `invalid_request`.
pub fn bad_request(description: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

/// 403 for a caller that may not have what it asked for.
pub fn forbidden(description: &str) -> Response {
    error(StatusCode::FORBIDDEN, "access_denied", description)
}

/// 404.
pub fn not_found(description: &str) -> Response {
    error(StatusCode::NOT_FOUND, "not_found", description)
}

/// 503 with `Retry-After`, which every SDK retries.
pub fn unavailable(description: &str, retry_after_secs: u64) -> Response {
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        description,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
    response
}

/// A JSON response with an explicit length, as the original sent.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    json_bytes(status, body.to_string().into_bytes())
}

fn json_bytes(status: StatusCode, bytes: Vec<u8>) -> Response {
    json_body(status, Body::from(bytes))
}

fn json_body(status: StatusCode, body: Body) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token {
            access_token: "eyJ.x.y".into(),
            expires_on: 1_003_600,
            not_before: 1_000_000,
            client_id: Some("c".into()),
            object_id: None,
        }
    }

    #[test]
    fn every_token_field_is_a_string() {
        let body = token_json(&token(), "https://vault.azure.net", 1_000_000);
        for field in [
            "access_token",
            "refresh_token",
            "expires_in",
            "expires_on",
            "ext_expires_in",
            "not_before",
            "resource",
            "token_type",
            "client_id",
        ] {
            assert!(body[field].is_string(), "{field}: {body}");
        }
        assert_eq!(body["expires_in"], "3600");
        assert_eq!(body["token_type"], "Bearer");
    }

    /// The bytes IMDS sends (keys in alphabetical order), which the answer built through a JSON value gave.
    #[tokio::test]
    async fn a_token_answer_is_byte_for_byte_the_imds_shape() {
        let response = tokens(&[token()], "https://vault.azure.net", 1_000_000);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        assert_eq!(
            String::from_utf8(bytes.to_vec()).unwrap(),
            r#"{"access_token":"eyJ.x.y","client_id":"c","expires_in":"3600","expires_on":"1003600","ext_expires_in":"3600","not_before":"1000000","refresh_token":"","resource":"https://vault.azure.net","token_type":"Bearer"}"#
        );
        let mut anonymous = token();
        anonymous.client_id = None;
        let value = token_json(&anonymous, "r", 2_000_000);
        assert!(value.get("client_id").is_none(), "{value}");
        assert_eq!(
            value["expires_in"], "0",
            "an expired token says 0, never a negative lifetime"
        );
    }

    async fn body_of(response: Response) -> (StatusCode, Bytes) {
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE].clone();
        assert_eq!(content_type, "application/json; charset=utf-8");
        (
            status,
            axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap(),
        )
    }

    #[tokio::test]
    async fn an_answer_written_this_second_is_sent_again_and_one_of_another_second_or_token_is_not() {
        let written = Written::default();
        let cached: Tokens = Arc::new(vec![token()]);
        let resource = "https://vault.azure.net";
        let fresh = |now| body_of(tokens(&cached, resource, now));
        let (status, first) = body_of(written.tokens(&cached, resource, 1_000_000)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first, fresh(1_000_000).await.1);
        // The same tokens in the same second: the very bytes written before.
        let (_, again) = body_of(written.tokens(&cached, resource, 1_000_000)).await;
        assert_eq!(again.as_ptr(), first.as_ptr());
        assert_eq!(written.len(), 1);
        // Equal tokens fetched anew are other tokens: written for themselves.
        let renewed: Tokens = Arc::new(vec![token()]);
        let (_, other) = body_of(written.tokens(&renewed, resource, 1_000_000)).await;
        assert_ne!(other.as_ptr(), first.as_ptr());
        assert_eq!(written.len(), 2);
        // The next second counts a second less, and what was written before goes.
        let (_, later) = body_of(written.tokens(&cached, resource, 1_000_001)).await;
        assert_eq!(later, fresh(1_000_001).await.1);
        assert_ne!(later, first);
        assert_eq!(written.len(), 1);
        // Another resource is never answered from what was written for the first.
        let (_, elsewhere) = body_of(written.tokens(&cached, "api://other", 1_000_001)).await;
        assert_eq!(elsewhere, fresh_for(&cached, "api://other", 1_000_001).await);
    }

    async fn fresh_for(cached: &Tokens, resource: &str, now: i64) -> Bytes {
        body_of(tokens(cached, resource, now)).await.1
    }

    #[tokio::test]
    async fn several_tokens_are_a_list_and_errors_have_two_fields() {
        let response = tokens(&[token(), token()], "r", 1_000_000);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value.as_array().map(Vec::len), Some(2));
        let response = unavailable("later", 0);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            value,
            json!({"error": "service_unavailable", "error_description": "later"})
        );
    }
}
