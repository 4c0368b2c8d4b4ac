//! The dashboard: one page at `/` of the `http://` listener, with its script, style sheet and
//! icon under `/dashboard/`, all compiled into the binary (no build step, no files to
//! install).
//!
//! The page holds no data, so it is served without a key: everything it shows comes from the
//! admin API (`crate::api`), which it calls with the key the user typed (kept in the tab's
//! `sessionStorage`, sent as `Authorization: Bearer`). Every answer carries a strict
//! Content-Security-Policy (only this origin's scripts, styles and API; no inline code, no
//! framing), so that what the API returns (client ids, topics, payloads) can never run as code
//! even if the page's escaping had a hole.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The policy every dashboard answer carries: this origin only, no inline script or style,
/// no plug-ins, no framing, no form posts elsewhere.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// A file of the dashboard.
#[derive(Debug, Clone, Copy)]
struct Asset {
    /// Its name under `/dashboard/` (the page itself is `index.html`, served at `/`).
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// Every file the dashboard has.
const ASSETS: [Asset; 4] = [
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_str!("index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("app.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("icon.svg"),
    },
];

impl Asset {
    fn named(name: &str) -> Option<Self> {
        ASSETS.iter().copied().find(|a| a.name == name)
    }
}

impl IntoResponse for Asset {
    fn into_response(self) -> Response {
        let mut response = (StatusCode::OK, self.body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        secure(headers);
        response
    }
}

/// The headers every dashboard answer carries, found or not.
fn secure(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary: a browser asks again each time (they are small),
    // rather than run an old script against a newer API.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
}

/// The dashboard's routes: `/` and `/dashboard/{file}`.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/", get(page))
        .route("/dashboard/{file}", get(file))
}

async fn page() -> Response {
    match Asset::named("index.html") {
        Some(asset) => asset.into_response(),
        None => not_found(),
    }
}

async fn file(Path(name): Path<String>) -> Response {
    match Asset::named(&name) {
        // The page has one address, `/`.
        Some(asset) if asset.name != "index.html" => asset.into_response(),
        _ => not_found(),
    }
}

fn not_found() -> Response {
    let mut response = (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found\n",
    )
        .into_response();
    secure(response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A GET of `path` over HTTP/1.1 from the dashboard's routes on a loopback port: the
    /// status line and headers (lower-cased names), and the body.
    async fn get(path: &str) -> (String, Vec<(String, String)>, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, router()).await });
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        server.abort();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines.next().unwrap().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers, body.to_owned())
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn the_page_is_html_under_a_strict_policy() {
        let (status, headers, body) = get("/").await;
        assert!(status.contains(" 200 "), "{status}");
        assert_eq!(
            header(&headers, "content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(header(&headers, "content-security-policy"), Some(CSP));
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&headers, "cache-control"), Some("no-cache"));
        assert!(body.contains("<!doctype html>"), "{body}");
        // No inline code: the policy would block it.
        assert!(!body.contains("<script>") && !body.contains("style=\""));
        assert!(!body.contains("onclick=") && !body.contains("javascript:"));
    }

    #[tokio::test]
    async fn every_file_the_page_names_is_served_with_its_type() {
        let (_, _, page) = get("/").await;
        for (path, content_type) in [
            ("/dashboard/app.js", "text/javascript; charset=utf-8"),
            ("/dashboard/app.css", "text/css; charset=utf-8"),
            ("/dashboard/icon.svg", "image/svg+xml"),
        ] {
            assert!(page.contains(path), "the page does not name {path}");
            let (status, headers, body) = get(path).await;
            assert!(status.contains(" 200 "), "{path}: {status}");
            assert_eq!(header(&headers, "content-type"), Some(content_type));
            assert_eq!(header(&headers, "content-security-policy"), Some(CSP));
            assert!(!body.is_empty());
        }
        for path in ["/dashboard/index.html", "/dashboard/nothing.js"] {
            let (status, headers, _) = get(path).await;
            assert!(status.contains(" 404 "), "{path}: {status}");
            assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        }
    }

    #[test]
    fn the_script_calls_only_the_api_it_is_served_with() {
        let script = Asset::named("app.js").unwrap().body;
        assert!(script.contains("/api/v1/"));
        // Nothing from elsewhere, nothing evaluated from strings.
        assert!(!script.contains("http://") && !script.contains("https://"));
        assert!(!script.contains("eval(") && !script.contains("innerHTML"));
    }
}
