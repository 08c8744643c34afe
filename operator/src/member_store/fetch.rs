//! What a MemberStore's probes and failovers need besides its spec: each
//! data centre's Redis password, Elasticsearch user and password and MySQL
//! password, and the MySQL admin account's, read by name from the
//! Secrets of the store's namespace that the spec references (never listed
//! or watched, as a pipeline's). A rotated password reaches the probes at
//! the next reconcile.

use std::collections::BTreeMap;

use ballast_crds::MemberStore;
use ballast_node::secret::Secret;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret as SecretObject;
use kube::api::Api;

/// The keys of an Elasticsearch credentials Secret.
const CREDENTIAL_KEYS: [&str; 2] = ["username", "password"];

/// The credentials of each data centre's servers, by data centre.
#[derive(Debug, Default)]
pub struct Credentials {
    /// Each Redis's `AUTH` password, where the spec names one.
    pub redis: BTreeMap<String, Secret>,
    /// Each Elasticsearch's user and password, where the spec names them.
    pub elasticsearch: BTreeMap<String, (String, Secret)>,
    /// Each MySQL's password of the member user, where the spec names one.
    pub mysql: BTreeMap<String, Secret>,
    /// The MySQL admin account, if the spec names one.
    pub mysql_admin: Option<super::mysql::Admin>,
}

/// Why a referenced credential could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The API server did not answer the read.
    #[error("reading Secret {name}: {source}")]
    Api {
        /// The Secret's name.
        name: String,
        /// What the API server said.
        #[source]
        source: kube::Error,
    },
    /// The Secret or its key does not exist.
    #[error("Secret {name} has no key {key} (data centre {data_center})")]
    Missing {
        /// The data centre whose server it is for.
        data_center: String,
        /// The Secret's name.
        name: String,
        /// The key looked for.
        key: String,
    },
}

/// Reads every credential `ms` references from its namespace `ns`.
pub async fn credentials(
    client: &kube::Client,
    ns: &str,
    ms: &MemberStore,
) -> Result<Credentials, FetchError> {
    let secrets: Api<SecretObject> = Api::namespaced(client.clone(), ns);
    let mut read: BTreeMap<String, Option<SecretObject>> = BTreeMap::new();
    let mut value = async |dc: &str, name: &str, key: &str| -> Result<Secret, FetchError> {
        if !read.contains_key(name) {
            let found = secrets.get_opt(name).await.map_err(|source| FetchError::Api {
                name: name.to_owned(),
                source,
            })?;
            read.insert(name.to_owned(), found);
        }
        read.get(name)
            .and_then(Option::as_ref)
            .and_then(|s| s.data.as_ref()?.get(key))
            .map(|ByteString(bytes)| Secret::from(String::from_utf8_lossy(bytes).into_owned()))
            .ok_or_else(|| FetchError::Missing {
                data_center: dc.to_owned(),
                name: name.to_owned(),
                key: key.to_owned(),
            })
    };
    let mut credentials = Credentials::default();
    for dc in &ms.spec.data_centers {
        if let Some(r) = &dc.mysql.password_secret_ref {
            let password = value(&dc.name, &r.name, &r.key).await?;
            credentials.mysql.insert(dc.name.clone(), password);
        }
        if let Some(r) = &dc.redis.password_secret_ref {
            let password = value(&dc.name, &r.name, &r.key).await?;
            credentials.redis.insert(dc.name.clone(), password);
        }
        if let Some(r) = &dc.elasticsearch.credentials_secret_ref {
            let [user, password] = CREDENTIAL_KEYS;
            let user = value(&dc.name, &r.name, user).await?.expose().to_owned();
            let password = value(&dc.name, &r.name, password).await?;
            credentials
                .elasticsearch
                .insert(dc.name.clone(), (user, password));
        }
    }
    if let Some(admin) = &ms.spec.mysql_admin {
        let password = match &admin.password_secret_ref {
            Some(r) => Some(value("(every)", &r.name, &r.key).await?),
            None => None,
        };
        credentials.mysql_admin = Some(super::mysql::Admin {
            user: admin.user.clone(),
            password,
        });
    }
    Ok(credentials)
}
