//! `s3://BUCKET?region=…&endpoint=…&scheme=http|https&profile=…` caches, as Nix writes
//! their URLs, read through `object_store`'s S3 client (SigV4, retries, credentials).
//!
//! Credentials come from the standard chain as `object_store` implements it (environment,
//! web identity, container and instance metadata), plus static keys from the shared
//! credentials file (`~/.aws/credentials`, or `AWS_SHARED_CREDENTIALS_FILE`): the section
//! `profile=` names, else `AWS_PROFILE`, else `default` when nothing else is configured.
//! A custom `endpoint` is addressed path-style (`ENDPOINT/BUCKET/KEY`), as Nix does; AWS
//! itself virtual-hosted style (`BUCKET.s3.REGION.amazonaws.com/KEY`).
//!
//! A missing key is "not in this cache", exactly as a 404 is. Everything else S3 says no
//! with (no such bucket, access denied, bad credentials) is an error naming the bucket, the
//! key and S3's own error code: an edge with the wrong credentials must not look like an
//! empty cache.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

use super::{Body, BoxFuture, CachePath, ClientConfig, Fetched, Upstream, UpstreamError};

/// Settings Nix's S3 store takes for writing (compression, signing, listings…): accepted
/// and ignored, so one URL serves the builder that writes and the edge that reads.
const NIX_WRITE_SETTINGS: [&str; 12] = [
    "compression",
    "write-nar-listing",
    "secret-key",
    "parallel-compression",
    "multipart-upload",
    "buffer-size",
    "narinfo-compression",
    "ls-compression",
    "log-compression",
    "want-mass-query",
    "priority",
    "index-debug-info",
];

/// Why S3 refused a request (besides "no such key", which is not an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3Cause {
    /// The bucket does not exist (at this endpoint and region).
    #[error("no such bucket")]
    NoSuchBucket,
    /// S3 refused the credentials or the request (`code` is S3's error code, such as
    /// `InvalidAccessKeyId`, `SignatureDoesNotMatch` or `AccessDenied`).
    #[error("access denied ({code}): check the credentials and the bucket's policy")]
    AccessDenied { code: String },
    /// No credentials could be found or fetched.
    #[error("no usable credentials: {err}")]
    Credentials { err: String },
    /// Anything else: connection errors, server errors after the retries.
    #[error("{err}")]
    Request { err: String },
}

/// A parsed `s3://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    pub region: Option<String>,
    /// `HOST[:PORT]`, or a whole `scheme://HOST[:PORT]`.
    pub endpoint: Option<String>,
    pub scheme: Option<String>,
    pub profile: Option<String>,
}

impl S3Url {
    /// Parses `s3://BUCKET?region=…&endpoint=…&scheme=…&profile=…`. Nix's settings for
    /// writing are ignored; anything else is refused, so a misspelt setting is not silently
    /// dropped.
    pub fn parse(url: &str) -> Result<S3Url, UpstreamError> {
        let bad = |reason: &'static str| UpstreamError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let rest = url.strip_prefix("s3://").ok_or(bad("expected s3://"))?;
        let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
        let bucket = bucket.trim_end_matches('/');
        // S3's bucket naming rules (3 to 63 of a-z, 0-9, '.' and '-'), loosened to the
        // upper case and '_' that older buckets and S3-compatible stores allow.
        if bucket.len() < 3
            || bucket.len() > 63
            || !bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(bad("not a valid bucket name"));
        }
        let mut parsed = S3Url {
            bucket: bucket.to_owned(),
            region: None,
            endpoint: None,
            scheme: None,
            profile: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match key {
                "region" => &mut parsed.region,
                "endpoint" => &mut parsed.endpoint,
                "scheme" => &mut parsed.scheme,
                "profile" => &mut parsed.profile,
                k if NIX_WRITE_SETTINGS.contains(&k) => continue,
                _ => {
                    return Err(bad(
                        "unknown setting (known: region, endpoint, scheme, profile)",
                    ))
                }
            };
            if value.is_empty() || value.contains(char::is_whitespace) {
                return Err(bad("empty or blank setting"));
            }
            *slot = Some(value.to_owned());
        }
        if !matches!(parsed.scheme.as_deref(), None | Some("http" | "https")) {
            return Err(bad("scheme must be http or https"));
        }
        Ok(parsed)
    }

    /// The endpoint as a URL, when one is set: `scheme://HOST[:PORT]` (https by default).
    fn endpoint_url(&self) -> Option<String> {
        let endpoint = self.endpoint.as_deref()?;
        if endpoint.contains("://") {
            return Some(endpoint.to_owned());
        }
        Some(format!(
            "{}://{endpoint}",
            self.scheme.as_deref().unwrap_or("https")
        ))
    }

    /// The S3 client for this bucket: the environment's settings, overridden by the URL's.
    pub fn client(&self, config: &ClientConfig) -> Result<AmazonS3, UpstreamError> {
        let fail = |err: String| UpstreamError::S3Config {
            url: format!("s3://{}", self.bucket),
            err,
        };
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&self.bucket);
        if let Some(region) = &self.region {
            builder = builder.with_region(region);
        } else if builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .is_none()
        {
            // Nix's default region.
            builder = builder.with_region("us-east-1");
        }
        let endpoint = self.endpoint_url();
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        if let Some(endpoint) = &endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        } else if builder
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .is_none()
            && !self.bucket.contains('.')
        {
            // AWS itself: `BUCKET.s3.REGION.amazonaws.com`, as Nix's SDK addresses it (a
            // dotted name would not match the certificate's wildcard, so it stays
            // path-style).
            builder = builder.with_virtual_hosted_style_request(true);
        }
        let has_env_keys = builder
            .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
            .is_some();
        let profile = self
            .profile
            .clone()
            .or_else(|| std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()));
        match (&profile, has_env_keys) {
            // A profile named in the URL wins over the environment, as in Nix.
            (Some(name), _) if self.profile.is_some() || !has_env_keys => {
                let keys = profile_keys(name).map_err(fail)?;
                builder = keys.apply(builder);
            }
            (None, false) if !other_credential_source() => {
                if let Ok(keys) = profile_keys("default") {
                    builder = keys.apply(builder);
                }
            }
            _ => {}
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: config.backoff,
                max_backoff: config.max_backoff,
                base: 2.0,
            },
            max_retries: usize::try_from(config.retries).unwrap_or(usize::MAX),
            retry_timeout: config.first_byte_timeout,
        };
        // No whole-request timeout: a large NAR takes as long as it takes, within the
        // deadlines `Cache` enforces (the minimum rate, the NAR deadline).
        let options = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(config.connect_timeout)
            .with_read_timeout(config.read_timeout)
            .with_timeout_disabled();
        builder
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| fail(e.to_string()))
    }
}

/// Whether the environment names a credential source other than static keys (web
/// identity, container credentials), which `object_store` uses before instance metadata.
fn other_credential_source() -> bool {
    [
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Static keys from one section of the shared credentials file.
struct ProfileKeys {
    key_id: String,
    secret: String,
    token: Option<String>,
}

impl ProfileKeys {
    fn apply(self, builder: AmazonS3Builder) -> AmazonS3Builder {
        let builder = builder
            .with_access_key_id(self.key_id)
            .with_secret_access_key(self.secret);
        match self.token {
            Some(t) => builder.with_token(t),
            None => builder,
        }
    }
}

fn credentials_file() -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        return Some(f.into());
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    Some(home.join(".aws").join("credentials"))
}

fn profile_keys(name: &str) -> Result<ProfileKeys, String> {
    let file = credentials_file()
        .ok_or_else(|| format!("profile {name:?}: no HOME and no AWS_SHARED_CREDENTIALS_FILE"))?;
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("profile {name:?}: cannot read {}: {e}", file.display()))?;
    parse_profile(&text, name).ok_or_else(|| {
        format!(
            "profile {name:?}: no section [{name}] with aws_access_key_id and \
             aws_secret_access_key in {} (only static keys are read from profiles)",
            file.display()
        )
    })
}

/// The static keys of section `[name]` of an INI-style credentials file.
fn parse_profile(text: &str, name: &str) -> Option<ProfileKeys> {
    let (mut in_section, mut key_id, mut secret, mut token) = (false, None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_section = section.trim() == name;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => key_id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some(ProfileKeys {
        key_id: key_id?,
        secret: secret?,
        token,
    })
}

/// S3's error code (`<Code>…</Code>` of its XML error body), when the message carries it.
fn s3_code(message: &str) -> Option<&str> {
    let start = message.find("<Code>")? + "<Code>".len();
    let len = message[start..].find("</Code>")?;
    Some(&message[start..start + len])
}

/// Sorts an `object_store` error: `Ok(())` when the key is simply missing.
pub fn classify(e: &object_store::Error) -> Result<(), S3Cause> {
    let message = e.to_string();
    let code = s3_code(&message).map(str::to_owned);
    // Listings fail as `Generic` errors whatever the status: S3's code decides first.
    match code.as_deref() {
        Some("NoSuchBucket") => return Err(S3Cause::NoSuchBucket),
        Some(
            c @ ("AccessDenied"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "ExpiredToken"
            | "InvalidToken"
            | "AllAccessDisabled"),
        ) => return Err(S3Cause::AccessDenied { code: c.to_owned() }),
        _ => {}
    }
    match e {
        object_store::Error::NotFound { .. } => Ok(()),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Err(S3Cause::AccessDenied {
            code: code.unwrap_or_else(|| "AccessDenied".to_owned()),
        }),
        // Credential providers fail before any request reaches the bucket; the last one
        // in the chain asks the instance (or container) metadata address.
        _ if message.contains("credential") || message.contains("169.254.") => {
            Err(S3Cause::Credentials { err: message })
        }
        _ => Err(S3Cause::Request { err: message }),
    }
}

#[derive(Debug)]
pub struct S3Upstream {
    /// `s3://BUCKET`: the URL without its settings, for messages and `URL` confinement.
    url: String,
    bucket: String,
    store: Arc<AmazonS3>,
    /// Set once the bucket was seen to exist. Some S3-compatible servers answer a GET in a
    /// missing bucket with `NoSuchKey`, so the first missing key is followed by a listing
    /// (which only an existing bucket answers), lest a misspelt bucket look like an empty
    /// cache.
    bucket_seen: tokio::sync::OnceCell<()>,
    /// Set once `nix-cache-info` was read with these credentials. Without s3:ListBucket,
    /// S3 answers a missing key with 403 `AccessDenied`, not 404; once the credentials are
    /// known to work, that answer means "not in this cache" (as Nix takes it).
    credentials_proved: tokio::sync::OnceCell<()>,
}

impl S3Upstream {
    pub fn new(url: &str, config: &ClientConfig) -> Result<Self, UpstreamError> {
        let parsed = S3Url::parse(url)?;
        let store = parsed.client(config)?;
        Ok(S3Upstream::with_client(&parsed.bucket, store))
    }

    /// The cache in `bucket`, through a client configured by the caller (explicit
    /// credentials, say).
    pub fn with_client(bucket: &str, client: AmazonS3) -> Self {
        S3Upstream {
            url: format!("s3://{bucket}"),
            bucket: bucket.to_owned(),
            store: Arc::new(client),
            bucket_seen: tokio::sync::OnceCell::new(),
            credentials_proved: tokio::sync::OnceCell::new(),
        }
    }

    /// Lists (at most) one key, once: fails with [`S3Cause::NoSuchBucket`] when the bucket
    /// does not exist.
    async fn check_bucket(&self, key: &str) -> Result<(), UpstreamError> {
        self.bucket_seen
            .get_or_try_init(|| async {
                let prefix = ObjectPath::from("nix-cache-info");
                match self.store.list_with_delimiter(Some(&prefix)).await {
                    Ok(_) => Ok(()),
                    Err(object_store::Error::NotFound { .. }) => {
                        Err(self.error(key, S3Cause::NoSuchBucket))
                    }
                    Err(e) => match classify(&e) {
                        Ok(()) => Err(self.error(key, S3Cause::NoSuchBucket)),
                        Err(cause) => Err(self.error(key, cause)),
                    },
                }
            })
            .await
            .map(|_| ())
    }

    /// Whether these credentials can read the bucket's `nix-cache-info` (asked once while
    /// it succeeds; a failure is asked again next time).
    async fn credentials_work(&self) -> bool {
        self.credentials_proved
            .get_or_try_init(|| async {
                self.store
                    .head(&ObjectPath::from("nix-cache-info"))
                    .await
                    .map(|_| ())
            })
            .await
            .is_ok()
    }

    fn error(&self, key: &str, cause: S3Cause) -> UpstreamError {
        UpstreamError::S3 {
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            cause,
        }
    }
}

impl Upstream for S3Upstream {
    fn url(&self) -> &str {
        &self.url
    }

    fn get<'a>(
        &'a self,
        path: &'a CachePath,
    ) -> BoxFuture<'a, Result<Option<Fetched>, UpstreamError>> {
        Box::pin(async move {
            // The query (`nar/x.nar?hash=…`) is for HTTP caches; S3 keys never carry one.
            let key = path.path();
            let result = match self.store.get(&ObjectPath::from(key)).await {
                Ok(r) => r,
                Err(e) => {
                    return match classify(&e) {
                        Ok(()) => self.check_bucket(key).await.map(|()| None),
                        // Only plain AccessDenied: a wrong key, a bad signature or an
                        // expired token have codes of their own and stay errors.
                        Err(S3Cause::AccessDenied { code })
                            if code == "AccessDenied"
                                && key != "nix-cache-info"
                                && self.credentials_work().await =>
                        {
                            Ok(None)
                        }
                        Err(cause) => Err(self.error(key, cause)),
                    };
                }
            };
            Ok(Some(Fetched {
                len: Some(result.meta.size),
                body: Box::new(S3Body {
                    stream: result.into_stream(),
                    url: format!("{}/{key}", self.url),
                }),
            }))
        })
    }
}

/// An object's bytes as S3 sends them, chunk by chunk (never the whole object).
struct S3Body {
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    url: String,
}

impl Body for S3Body {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
        Box::pin(async move {
            match self.stream.next().await {
                None => Ok(None),
                Some(Ok(chunk)) => Ok(Some(chunk)),
                Some(Err(e)) => Err(UpstreamError::Body {
                    url: self.url.clone(),
                    err: e.to_string(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_as_nix_writes_them() {
        let u = S3Url::parse(
            "s3://my-cache?region=eu-west-1&endpoint=127.0.0.1:9000&scheme=http&profile=edge",
        )
        .expect("a valid URL");
        assert_eq!(u.bucket, "my-cache");
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        assert_eq!(u.endpoint_url().as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.profile.as_deref(), Some("edge"));
        let plain = S3Url::parse("s3://my-cache").expect("a bare bucket");
        assert_eq!(plain.endpoint_url(), None);
        let https = S3Url::parse("s3://my-cache?endpoint=minio.local&compression=zstd")
            .expect("write settings are ignored");
        assert_eq!(https.endpoint_url().as_deref(), Some("https://minio.local"));
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason() {
        for bad in [
            "s3://",
            "s3://ab",
            "s3://bucket/with/key",
            "s3://bucket?regoin=x",
            "s3://bucket?scheme=ftp",
            "s3://bucket?region=",
            "http://bucket",
        ] {
            assert!(
                matches!(S3Url::parse(bad), Err(UpstreamError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn profiles_give_their_static_keys() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n\
                    # edge nodes\n[edge]\naws_access_key_id=C\naws_secret_access_key=D\n\
                    aws_session_token=E\n[empty]\n";
        let edge = parse_profile(text, "edge").expect("edge has keys");
        assert_eq!((edge.key_id.as_str(), edge.secret.as_str()), ("C", "D"));
        assert_eq!(edge.token.as_deref(), Some("E"));
        let default = parse_profile(text, "default").expect("default has keys");
        assert_eq!(default.key_id, "A");
        assert!(default.token.is_none());
        assert!(parse_profile(text, "empty").is_none());
        assert!(parse_profile(text, "missing").is_none());
    }

    #[test]
    fn s3_error_codes_are_read_from_the_error_body() {
        let body = "Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\
                    <Error><Code>NoSuchBucket</Code><Message>x</Message></Error>";
        assert_eq!(s3_code(body), Some("NoSuchBucket"));
        assert_eq!(s3_code("connection refused"), None);
    }
}
