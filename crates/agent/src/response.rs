//! Answers in the shapes IMDS and the original agent used, which every SDK parses: a token with every
//! field a JSON string, errors as `{"error", "error_description"}`.

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::upstream::Token;

/// The JSON of one token, all fields strings as IMDS sends them (the Rust SDK refuses a numeric
/// `expires_on`; MSAL needs `expires_in`; Python reads `resource`).
pub fn token_json(token: &Token, resource: &str, now: i64) -> Value {
    let expires_in = (token.expires_on - now).max(0).to_string();
    let mut body = json!({
        "access_token": token.access_token,
        "refresh_token": "",
        "expires_in": expires_in,
        "expires_on": token.expires_on.to_string(),
        "ext_expires_in": expires_in,
        "not_before": token.not_before.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    });
    if let Some(client_id) = &token.client_id {
        body["client_id"] = json!(client_id);
    }
    body
}

/// The answer to a token request: one token as an object; for a multi-tenant service principal a list,
/// the primary tenant's first, as the original answered.
pub fn tokens(tokens: &[Token], resource: &str, now: i64) -> Response {
    let body = match tokens {
        [single] => token_json(single, resource, now),
        many => Value::Array(many.iter().map(|t| token_json(t, resource, now)).collect()),
    };
    json_response(StatusCode::OK, &body)
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
    let bytes = body.to_string();
    let mut response = (status, Body::from(bytes)).into_response();
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
