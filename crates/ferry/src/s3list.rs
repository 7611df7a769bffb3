//! An S3 listing that keeps every key, for when object_store's own cannot.
//!
//! object_store parses each listed key into its `Path`, which holds no empty segment (`a//b.jpg`)
//! and no control character. One such key fails the page it is on, and the listing stops there,
//! so a single oddly named object would stop a whole job. When that happens the prefix is listed
//! again here, with ListObjectsV2 requests signed by object_store's own authorizer and
//! credentials, so that those keys can be reported as failed objects and the others run. The
//! response parser ([`parse_page`]) does no I/O. A prefix that is not a folder is listed through
//! the store's own paginated listing, which takes a prefix as a string.

use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey as Key, AwsAuthorizer};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::ClientOptions;
use serde::Deserialize;

/// Lists one bucket with plain ListObjectsV2 requests.
#[derive(Debug, Clone)]
pub(crate) struct Lister {
    /// The HTTP client is made when a listing is needed, which is seldom.
    options: ClientOptions,
    /// The bucket's URL, as object_store builds it (path style unless configured otherwise).
    bucket_url: String,
    region: String,
    store: Arc<AmazonS3>,
    sign: bool,
}

impl Lister {
    /// A lister for the bucket `builder` (already built into `store`) names.
    pub(crate) fn new(builder: &AmazonS3Builder, store: Arc<AmazonS3>, allow_http: bool) -> Self {
        let get = |k: Key| builder.get_config_value(&k);
        let bucket = get(Key::Bucket).unwrap_or_default();
        let region = get(Key::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = get(Key::VirtualHostedStyleRequest).is_some_and(|v| v == "true");
        let bucket_url = match (get(Key::Endpoint), virtual_hosted) {
            (Some(endpoint), true) => endpoint,
            (Some(endpoint), false) => format!("{}/{bucket}", endpoint.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let options = ClientOptions::new().with_allow_http(allow_http);
        let sign = get(Key::SkipSignature).is_none_or(|v| v != "true");
        Self { options, bucket_url, region, store, sign }
    }

    /// Every object whose key begins with `prefix`, a string rather than a folder, through the
    /// store's own paginated listing (its signing and retries); an object whose key a `Path`
    /// cannot name fails it with [`object_store::Error::InvalidPath`], as the store's own
    /// listing does.
    pub(crate) async fn list_paginated(&self, prefix: &str) -> object_store::Result<Vec<object_store::ObjectMeta>> {
        let (mut all, mut token) = (Vec::new(), None);
        loop {
            let opts = PaginatedListOptions { page_token: token.take(), ..Default::default() };
            let page = self.store.list_paginated(Some(prefix), opts).await?;
            all.extend(page.result.objects);
            match page.page_token {
                Some(t) => token = Some(t),
                None => return Ok(all),
            }
        }
    }

    /// Every key under `prefix` with its size, in the store's order.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Listed, String> {
        let client: HttpClient = ReqwestConnector::default().connect(&self.options).map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = url::Url::parse(&self.bucket_url).map_err(|e| format!("{}: {e}", self.bucket_url))?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("list-type", "2").append_pair("prefix", prefix);
                if let Some(t) = &token {
                    q.append_pair("continuation-token", t);
                }
            }
            let mut request = http::Request::builder()
                .method("GET")
                .uri(url.as_str())
                .body(HttpRequestBody::empty())
                .map_err(|e| e.to_string())?;
            if self.sign {
                let credential = self.store.credentials().get_credential().await.map_err(|e| e.to_string())?;
                AwsAuthorizer::new(&credential, "s3", &self.region)
                    .try_authorize(&mut request, None)
                    .map_err(|e| e.to_string())?;
            }
            let response = client.execute(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response.into_body().bytes().await.map_err(|e| e.to_string())?;
            if !status.is_success() {
                return Err(format!("listing returned {status}: {}", String::from_utf8_lossy(&body)));
            }
            let (keys, next) = parse_page(&body)?;
            all.extend(keys);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(all),
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Page {
    #[serde(default)]
    contents: Vec<Entry>,
    #[serde(default)]
    is_truncated: bool,
    next_continuation_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    key: String,
    size: u64,
}

/// Listed keys with their sizes in bytes.
pub(crate) type Listed = Vec<(String, u64)>;

/// The keys and sizes of one ListObjectsV2 response, and the token of the next page if any.
///
/// Keys are asked for as they are, not URL-encoded (`encoding-type=url`): servers disagree on
/// what a `+` means in an encoded key (AWS encodes a space as `+`, s3s-fs leaves a `+` as it is),
/// and XML carries every character but a few control characters.
pub(crate) fn parse_page(xml: &[u8]) -> Result<(Listed, Option<String>), String> {
    let page: Page = quick_xml::de::from_reader(xml).map_err(|e| format!("unreadable listing: {e}"))?;
    let keys = page.contents.into_iter().map(|e| (e.key, e.size)).collect();
    let next = page.next_continuation_token.filter(|t| page.is_truncated && !t.is_empty());
    Ok((keys, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::path::Path;
    use object_store::{ObjectStore, ObjectStoreExt};

    /// Against a server that checks signatures (s3s-fs, as the S3 tests use), the lister's
    /// requests are accepted and list what object_store lists, over several pages.
    #[tokio::test]
    async fn lists_what_the_store_lists_with_signed_requests() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bucket")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        struct Stop(std::process::Child);
        impl Drop for Stop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _server = Stop(
            std::process::Command::new("s3s-fs")
                .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", "k", "--secret-key", "s"])
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("s3s-fs is not installed: cargo install s3s-fs@0.14.1 --features binary --locked"),
        );
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let builder = AmazonS3Builder::new()
            .with_bucket_name("bucket")
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .with_region("us-east-1");
        let store = Arc::new(builder.clone().build().unwrap());
        for i in 0..1234 {
            let key = format!("in/{}/é {i:04}+x.jpg", i % 3);
            store.put(&Path::parse(&key).unwrap(), vec![7; i % 5].into()).await.unwrap();
        }
        store.put(&Path::from("other/x.jpg"), vec![1].into()).await.unwrap();
        let lister = Lister::new(&builder, store.clone(), true);
        let mut ours = lister.list("in/").await.unwrap();
        let mut theirs: Vec<(String, u64)> = store
            .list(Some(&Path::from("in")))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .unwrap();
        ours.sort();
        theirs.sort();
        assert_eq!(ours.len(), 1234);
        assert!(ours == theirs, "the listings differ");
        let wrong = builder.with_secret_access_key("not the secret");
        let refused = Lister::new(&wrong, Arc::new(wrong.clone().build().unwrap()), true);
        let err = refused.list("in/").await.unwrap_err();
        assert!(err.contains("403"), "{err}");
    }

    #[test]
    fn pages_are_read_with_their_keys_as_they_are() {
        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>
<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>b</Name><Prefix>in/</Prefix>
<KeyCount>3</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>
<Contents><Key>in//x.jpg</Key><LastModified>2026-11-28T19:56:53.000Z</LastModified><Size>10</Size></Contents>
<Contents><Key>in/a b/c+d &amp; %20e.jpg</Key><Size>0</Size></Contents>
<Contents><Key>in/t\tab\u{1}é.jpg</Key><Size>7</Size><StorageClass>STANDARD</StorageClass></Contents>
<NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken></ListBucketResult>";
        let (keys, next) = parse_page(xml.as_bytes()).unwrap();
        let expect = [("in//x.jpg", 10), ("in/a b/c+d & %20e.jpg", 0), ("in/t\tab\u{1}é.jpg", 7)];
        assert_eq!(keys, expect.map(|(k, n)| (k.to_string(), n)));
        assert_eq!(next.as_deref(), Some("1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="));
        // The last page has no token; an empty one has no contents.
        let last = b"<ListBucketResult><IsTruncated>false</IsTruncated>\
            <Contents><Key>a.jpg</Key><Size>1</Size></Contents></ListBucketResult>";
        assert_eq!(parse_page(last).unwrap(), (vec![("a.jpg".into(), 1)], None));
        let empty = b"<ListBucketResult><IsTruncated>false</IsTruncated><KeyCount>0</KeyCount></ListBucketResult>";
        assert_eq!(parse_page(empty).unwrap(), (vec![], None));
        assert!(parse_page(b"<html>502 Bad Gateway").is_err());
    }
}
