//! Who may call the API, and how much: bearer tokens from `GATEWAY_API_TOKENS_FILE`, a request
//! rate and a number of WebSocket subscriptions per token.
//!
//! - A request to a protected route carries its token as `Authorization: Bearer <token>`; a
//!   browser's WebSocket, which cannot set headers, offers the subprotocols `telemetry` and
//!   `bearer.<token>` instead (`Sec-WebSocket-Protocol`; the server selects `telemetry`).
//! - The check happens before any handler, so a missing or wrong token gets its 401 without
//!   etcd being asked anything.
//! - [`Tokens`] holds only SHA-256 digests of the tokens. A presented token is hashed and
//!   compared with every digest in constant time ([`subtle`]): the time taken depends on
//!   neither the token's length nor on how much of it matches, nor on which entry matched.
//! - A token's requests go through a keyed `governor` limiter (`GATEWAY_TOKEN_RATE` per
//!   second, bursts of `GATEWAY_TOKEN_BURST`); its WebSocket subscriptions hold permits of a
//!   per-token semaphore (`GATEWAY_TOKEN_MAX_SUBSCRIPTIONS`). Either limit answers 429 with
//!   `Retry-After`.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock as _};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use telemetry_shared::observe::emit;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    config::TokenLimits,
    error::ApiError,
    events::{AuthRefused, TokenLimited},
};

/// The shortest token accepted in the file.
pub(crate) const MIN_TOKEN_LEN: usize = 16;

/// The WebSocket subprotocol a browser offers beside `bearer.<token>`, and the one selected.
pub(crate) const WS_PROTOCOL: &str = "telemetry";

/// The prefix of a subprotocol that carries a token.
pub(crate) const WS_TOKEN_PREFIX: &str = "bearer.";

/// How long a client refused for its subscriptions is asked to wait.
const SUBSCRIPTIONS_RETRY_AFTER: Duration = Duration::from_secs(5);

/// A token as the gateway knows it once verified: its SHA-256 digest, never the token. The
/// limits are keyed by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TokenId([u8; 32]);

impl TokenId {
    /// A short, stable name for logs: `sha256:` and the digest's first 8 hex digits.
    pub(crate) fn fingerprint(&self) -> String {
        format!("sha256:{}", hex(&self.0[..4]))
    }
}

impl std::fmt::Debug for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The accepted tokens, as digests.
#[derive(Default)]
pub(crate) struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({})", self.digests.len())
    }
}

impl Tokens {
    /// Parses a tokens file: one token per line, surrounding white space ignored, blank lines
    /// and lines starting with `#` skipped. A token is at least [`MIN_TOKEN_LEN`] printable
    /// ASCII characters without spaces; an error names the line, never its content.
    pub(crate) fn parse(text: &[u8]) -> Result<Tokens, String> {
        let text = std::str::from_utf8(text).map_err(|_| "is not UTF-8 text".to_string())?;
        let mut digests = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "line {}: a token is printable ASCII without spaces",
                    index + 1
                ));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {}: a token is at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)",
                    index + 1
                ));
            }
            digests.push(digest(token.as_bytes()));
        }
        Ok(Tokens { digests })
    }

    /// How many tokens are accepted.
    pub(crate) fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether no token is accepted at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The token's identity if it is one of ours. Constant time: the presented token is
    /// hashed (so its length and content no longer shape the comparison), then compared with
    /// every digest, without stopping at a match.
    pub(crate) fn verify(&self, presented: &[u8]) -> Option<TokenId> {
        let presented = digest(presented);
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known[..].ct_eq(&presented[..]);
        }
        bool::from(found).then_some(TokenId(presented))
    }
}

/// The token a request presents: `Authorization: Bearer <token>`, else a WebSocket subprotocol
/// `bearer.<token>`. `None` when it presents none.
pub(crate) fn presented(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    bearer.or_else(|| {
        headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|p| p.trim().strip_prefix(WS_TOKEN_PREFIX))
    })
}

/// The tokens and the limits of each.
pub(crate) struct Auth {
    tokens: RwLock<Arc<Tokens>>,
    /// `None` when `GATEWAY_TOKEN_RATE` is 0 (no rate limit).
    requests: Option<DefaultKeyedRateLimiter<TokenId>>,
    /// One semaphore per token that has subscribed; `None` when unlimited.
    subscriptions: Option<Mutex<HashMap<TokenId, Arc<Semaphore>>>>,
    limits: TokenLimits,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.current())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Accepts `tokens`, each within `limits`.
    pub(crate) fn new(tokens: Tokens, limits: TokenLimits) -> Self {
        let requests = NonZeroU32::new(limits.rate).map(|rate| {
            let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Auth {
            tokens: RwLock::new(Arc::new(tokens)),
            requests,
            subscriptions: (limits.max_subscriptions > 0).then(Mutex::default),
            limits,
        }
    }

    fn current(&self) -> Arc<Tokens> {
        self.tokens.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Accepts `tokens` from now on (the file changed); forgets the limiter state of tokens no
    /// longer in use.
    pub(crate) fn replace(&self, tokens: Tokens) -> usize {
        let count = tokens.len();
        *self.tokens.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(tokens);
        if let Some(requests) = &self.requests {
            requests.retain_recent();
        }
        count
    }

    /// Lets a request through with its token's identity, or refuses it: 401 without a valid
    /// token, 429 past the token's request rate.
    pub(crate) fn authorize(&self, headers: &HeaderMap, route: &str) -> Result<TokenId, ApiError> {
        let Some(token) = presented(headers) else {
            emit(AuthRefused {
                reason: "missing",
                route: route.to_string(),
            });
            return Err(unauthorized(
                "unauthorized",
                "this API needs a token: send `Authorization: Bearer <token>` (a browser \
                 WebSocket may offer the subprotocols `telemetry` and `bearer.<token>`)",
                None,
            ));
        };
        let Some(id) = self.current().verify(token.as_bytes()) else {
            emit(AuthRefused {
                reason: "invalid",
                route: route.to_string(),
            });
            return Err(unauthorized(
                "invalid_token",
                "the token is not accepted by this gateway (unknown, or removed from \
                 GATEWAY_API_TOKENS_FILE)",
                Some("invalid_token"),
            ));
        };
        if let Some(requests) = &self.requests
            && let Err(not_until) = requests.check_key(&id)
        {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            emit(TokenLimited {
                limit: "requests",
                token: id.fingerprint(),
            });
            return Err(too_many(
                "rate_limited",
                format!(
                    "this token may make {} requests per second (bursts of {}; \
                     GATEWAY_TOKEN_RATE, GATEWAY_TOKEN_BURST); retry after Retry-After seconds",
                    self.limits.rate, self.limits.burst
                ),
                wait,
            ));
        }
        Ok(id)
    }

    /// A subscription slot of token `id` (held for the life of the socket), or 429 when it
    /// already has `GATEWAY_TOKEN_MAX_SUBSCRIPTIONS`. `Ok(None)` when unlimited.
    pub(crate) fn subscribe(&self, id: TokenId) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        let Some(slots) = &self.subscriptions else {
            return Ok(None);
        };
        let semaphore = {
            let mut slots = slots.lock().unwrap_or_else(PoisonError::into_inner);
            // Forget tokens with nothing open (removed tokens do not pile up).
            let max = self.limits.max_subscriptions as usize;
            slots.retain(|_, s| s.available_permits() < max);
            slots
                .entry(id)
                .or_insert_with(|| Arc::new(Semaphore::new(max)))
                .clone()
        };
        match semaphore.try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                emit(TokenLimited {
                    limit: "subscriptions",
                    token: id.fingerprint(),
                });
                Err(too_many(
                    "too_many_subscriptions",
                    format!(
                        "this token already has {} WebSocket subscriptions open \
                         (GATEWAY_TOKEN_MAX_SUBSCRIPTIONS); close one, or retry later",
                        self.limits.max_subscriptions
                    ),
                    SUBSCRIPTIONS_RETRY_AFTER,
                ))
            }
        }
    }
}

/// 401 with `WWW-Authenticate` (RFC 6750).
fn unauthorized(code: &str, detail: &str, error: Option<&str>) -> ApiError {
    let challenge = match error {
        Some(error) => format!("Bearer realm=\"telemetry\", error=\"{error}\""),
        None => "Bearer realm=\"telemetry\"".to_string(),
    };
    let error = ApiError::new(StatusCode::UNAUTHORIZED, code, detail);
    match HeaderValue::from_str(&challenge) {
        Ok(value) => error.with_header(header::WWW_AUTHENTICATE, value),
        Err(_) => error,
    }
}

/// 429 with `Retry-After` in whole seconds (at least 1).
fn too_many(code: &str, detail: String, wait: Duration) -> ApiError {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, detail)
        .with_header(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a3f1c9e07b5d4c2a9e8f7d6c5b4a3921";
    const B: &str = "0123456789abcdef0123456789abcdef";

    fn limits(rate: u32, burst: u32, max_subscriptions: u32) -> TokenLimits {
        TokenLimits {
            rate,
            burst,
            max_subscriptions,
        }
    }

    #[test]
    fn the_file_skips_blank_lines_and_comments_and_names_bad_lines() {
        let tokens = Tokens::parse(format!("# ops\n\n  {A}  \n{B}\r\n#{B}x\n").as_bytes()).expect("valid");
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            Tokens::parse(b"# c\nshort\n").expect_err("short"),
            "line 2: a token is at least 16 characters (e.g. `openssl rand -hex 32`)"
        );
        assert!(
            Tokens::parse(format!("{A} {B}").as_bytes())
                .expect_err("space")
                .starts_with("line 1:")
        );
        assert!(Tokens::parse(&[0xff, 0xfe]).is_err());
        assert_eq!(Tokens::parse(b"").expect("empty").len(), 0);
    }

    #[test]
    fn verify_accepts_exactly_the_listed_tokens() {
        let tokens = Tokens::parse(format!("{A}\n{B}\n").as_bytes()).expect("valid");
        let a = tokens.verify(A.as_bytes()).expect("A is listed");
        let b = tokens.verify(B.as_bytes()).expect("B is listed");
        assert_ne!(a, b);
        assert_eq!(tokens.verify(A.as_bytes()), Some(a), "the identity is stable");
        for wrong in [
            "",
            &A[..A.len() - 1],
            &format!("{A}0"),
            &A.to_uppercase(),
            &format!(" {A}"),
            "a3f1c9e07b5d4c2a9e8f7d6c5b4a3920",
        ] {
            assert_eq!(tokens.verify(wrong.as_bytes()), None, "{wrong:?}");
        }
        assert_eq!(Tokens::default().verify(A.as_bytes()), None);
        // Logs name a token by a fingerprint of its digest, never by the token.
        assert!(a.fingerprint().starts_with("sha256:") && !a.fingerprint().contains(A));
        assert_eq!(format!("{a:?}"), a.fingerprint());
    }

    /// Constant time by construction: what is compared has the same length whatever is
    /// presented (a digest), every listed digest is compared, and the comparison is `subtle`'s.
    #[test]
    fn the_comparison_sees_fixed_length_digests_only() {
        let tokens = Tokens::parse(format!("{A}\n{B}\n").as_bytes()).expect("valid");
        assert!(tokens.digests.iter().all(|d| d.len() == 32));
        for presented in ["x", A, &"y".repeat(10_000)] {
            assert_eq!(digest(presented.as_bytes()).len(), 32);
        }
        // A match on the first entry and on the last give the same answer (no early exit that
        // skips work: both walk the whole list).
        let reversed = Tokens::parse(format!("{B}\n{A}\n").as_bytes()).expect("valid");
        assert_eq!(tokens.verify(A.as_bytes()), reversed.verify(A.as_bytes()));
    }

    #[test]
    fn the_token_comes_from_authorization_or_a_websocket_subprotocol() {
        let mut headers = HeaderMap::new();
        assert_eq!(presented(&headers), None);
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("telemetry, bearer.tok-1"),
        );
        assert_eq!(presented(&headers), Some("tok-1"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  tok-2 "));
        assert_eq!(presented(&headers), Some("tok-2"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(presented(&headers), Some("tok-1"));
    }

    #[test]
    fn refusals_are_401_or_429_with_their_headers() {
        let auth = Auth::new(Tokens::parse(A.as_bytes()).expect("valid"), limits(1, 2, 1));
        let mut headers = HeaderMap::new();
        let err = auth.authorize(&headers, "/r").expect_err("missing");
        assert_eq!(
            (err.status, err.body.error.as_str()),
            (StatusCode::UNAUTHORIZED, "unauthorized")
        );
        assert_eq!(err.headers[0].0, header::WWW_AUTHENTICATE);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer 0123456789abcdef0"),
        );
        let err = auth.authorize(&headers, "/r").expect_err("wrong");
        assert_eq!(err.body.error, "invalid_token");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {A}")).expect("header"),
        );
        let id = auth.authorize(&headers, "/r").expect("first of the burst");
        auth.authorize(&headers, "/r").expect("second of the burst");
        let err = auth.authorize(&headers, "/r").expect_err("past the burst");
        assert_eq!(err.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.headers[0], (header::RETRY_AFTER, HeaderValue::from(1u64)));
        let permit = auth.subscribe(id).expect("one subscription");
        let err = auth.subscribe(id).expect_err("a second one");
        assert_eq!(err.body.error, "too_many_subscriptions");
        assert_eq!(err.headers[0], (header::RETRY_AFTER, HeaderValue::from(5u64)));
        drop(permit);
        assert!(auth.subscribe(id).is_ok(), "the slot is free again");
        // Removed from the file: refused from the next request on.
        auth.replace(Tokens::parse(B.as_bytes()).expect("valid"));
        assert_eq!(
            auth.authorize(&headers, "/r").expect_err("removed").body.error,
            "invalid_token"
        );
    }

    #[test]
    fn zero_means_no_limit() {
        let auth = Auth::new(Tokens::parse(A.as_bytes()).expect("valid"), limits(0, 0, 0));
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {A}")).expect("header"),
        );
        for _ in 0..100 {
            let id = auth.authorize(&headers, "/r").expect("no rate limit");
            assert!(auth.subscribe(id).expect("no subscription limit").is_none());
        }
    }
}
