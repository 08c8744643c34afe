//! Typed connection options for the servers a pipeline names: the password
//! travels as a field, never inside a formatted URL, so any character in it
//! (`@`, `/`, `:`) reaches the server as written, and nothing that prints the
//! options prints a URL with the password in it.

use ballast_crds::refs::{MysqlRef, RedisRef};
use elasticsearch::Elasticsearch;
use elasticsearch::auth::Credentials;
use elasticsearch::http::Url;
use elasticsearch::http::transport::{SingleNodeConnectionPool, TransportBuilder};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};

use crate::secret::Secret;

/// `host` and `port` of a `host:port` address (the CRD's pattern), `default`
/// when no port is given. Pure.
pub fn host_port(address: &str, default: u16) -> (String, u16) {
    match address.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.parse().unwrap_or(default)),
        None => (address.to_owned(), default),
    }
}

/// Connection options for the MySQL database `mysql` names.
pub fn mysql(mysql: &MysqlRef, password: Option<&Secret>) -> mysql_async::Opts {
    let (host, port) = host_port(&mysql.address, 3306);
    mysql_async::OptsBuilder::default()
        .ip_or_hostname(host)
        .tcp_port(port)
        .user(Some(mysql.user.clone()))
        .pass(password.map(Secret::expose))
        .db_name(Some(mysql.database.clone()))
        .into()
}

/// Connection options for the Redis server `redis` names.
pub fn redis(redis: &RedisRef, password: Option<&Secret>) -> Result<ConnectionInfo, redis::RedisError> {
    let (host, port) = host_port(&redis.address, 6379);
    let mut settings = RedisConnectionInfo::default().set_db(i64::from(redis.database));
    if let Some(password) = password {
        settings = settings.set_password(password.expose());
    }
    Ok(ConnectionAddr::Tcp(host, port)
        .into_connection_info()?
        .set_redis_settings(settings))
}

/// A client of the Elasticsearch cluster at `url` (its path and query are
/// the cluster's; no credentials in it), with `credentials` (user and
/// password) sent as HTTP basic authentication when given.
pub fn elasticsearch(
    url: &str,
    credentials: Option<(String, Secret)>,
) -> Result<Elasticsearch, elasticsearch::Error> {
    let pool = SingleNodeConnectionPool::new(Url::parse(url)?);
    let mut builder = TransportBuilder::new(pool);
    if let Some((user, password)) = credentials {
        builder = builder.auth(Credentials::Basic(user, password.expose().to_owned()));
    }
    Ok(Elasticsearch::new(builder.build()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_with_url_characters_reaches_the_server_as_written() -> Result<(), redis::RedisError> {
        let password = Secret::from("p@ss/w:rd?#");
        let r = RedisRef {
            address: "kv.example:6380".into(),
            database: 3,
            password_secret_ref: None,
        };
        let info = redis(&r, Some(&password))?;
        assert_eq!(info.addr(), &ConnectionAddr::Tcp("kv.example".into(), 6380));
        assert_eq!(info.redis_settings().password(), Some(password.expose()));
        assert_eq!(info.redis_settings().db(), 3);
        let m = MysqlRef {
            address: "db.example:3307".into(),
            database: "ballast".into(),
            user: "u".into(),
            password_secret_ref: None,
        };
        let opts = mysql(&m, Some(&password));
        assert_eq!(
            (
                opts.ip_or_hostname(),
                opts.tcp_port(),
                opts.pass(),
                opts.db_name()
            ),
            ("db.example", 3307, Some(password.expose()), Some("ballast"))
        );
        assert_eq!(host_port("db", 3306), ("db".into(), 3306));
        Ok(())
    }
}
