//! The dashboard's static files, compiled into the binary (no CDN, nothing fetched at run
//! time), served on the admin listener with a strict Content-Security-Policy. Every figure
//! the pages show comes from the admin API, with the token the user signs in with.

/// Page paths: each serves the single-page app, which routes on the path.
const PAGES: [&str; 7] = [
    "/dashboard/gate/keys",
    "/dashboard/gate/traces",
    "/dashboard/gate/usage",
    "/dashboard/gate/groups",
    "/dashboard/gate/alerts",
    "/dashboard/settings/members/agents",
    "/dashboard/settings/members",
];

const INDEX: &[u8] = include_bytes!("../../dashboard/index.html");
const APP_JS: &[u8] = include_bytes!("../../dashboard/app.js");
/// Groups and Alerts (SPEC §7), built with the helpers app.js exports.
const FLEET_JS: &[u8] = include_bytes!("../../dashboard/fleet.js");
const APP_CSS: &[u8] = include_bytes!("../../dashboard/app.css");

/// No inline script or style, nothing from elsewhere, never framed.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'none'";

/// A dashboard response: status, content type, body, and where to redirect (for `/`).
pub struct Asset {
    pub status: u16,
    pub content_type: &'static str,
    pub body: &'static [u8],
    pub location: Option<&'static str>,
}

/// The asset for a dashboard path, or `None` if the path is not the dashboard's.
pub fn asset(path: &str) -> Option<Asset> {
    let path = path.trim_end_matches('/');
    let found = |content_type, body| Asset {
        status: 200,
        content_type,
        body,
        location: None,
    };
    match path {
        "" | "/dashboard" => Some(Asset {
            status: 302,
            content_type: "text/plain; charset=utf-8",
            body: b"",
            location: Some("/dashboard/gate/keys"),
        }),
        "/dashboard/assets/app.js" => Some(found("text/javascript; charset=utf-8", APP_JS)),
        "/dashboard/assets/fleet.js" => Some(found("text/javascript; charset=utf-8", FLEET_JS)),
        "/dashboard/assets/app.css" => Some(found("text/css; charset=utf-8", APP_CSS)),
        p if PAGES.contains(&p) => Some(found("text/html; charset=utf-8", INDEX)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_serve_the_app_and_unknown_paths_are_not_ours() {
        assert_eq!(asset("/dashboard/gate/keys").unwrap().body, INDEX);
        assert_eq!(asset("/dashboard/gate/groups").unwrap().body, INDEX);
        assert_eq!(asset("/dashboard/gate/alerts").unwrap().body, INDEX);
        assert_eq!(
            asset("/dashboard/settings/members/agents/").unwrap().body,
            INDEX
        );
        assert_eq!(asset("/dashboard").unwrap().status, 302);
        assert!(asset("/dashboard/assets/app.js").is_some());
        assert!(asset("/dashboard/assets/fleet.js").is_some());
        assert!(asset("/dashboard/../admin/keys").is_none());
        assert!(asset("/admin/keys").is_none());
    }
}
