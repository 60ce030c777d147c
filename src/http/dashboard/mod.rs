//! The built-in live dashboard: `GET /` serves a single page (plus its script
//! and stylesheet under `/dashboard/`) that subscribes to
//! `/index?query=…&subscribe=true` over WebSocket and draws a live grid of
//! hosts × services. The files are embedded in the binary; nothing is fetched
//! from anywhere else.
//!
//! The files hold no data, so they are served without the bearer token; the
//! page passes the `?token=` it was opened with on to its WebSocket, which
//! does require it.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// The dashboard's routes, to be merged into the main router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { file("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { file("text/css; charset=utf-8", STYLE_CSS) }),
        )
}

fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Small files: always revalidate so an upgraded binary's page is seen.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}
