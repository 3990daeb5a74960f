//! The schema of each backend, one migration per version. Never edit a shipped entry: append a
//! new one (to both lists when the change concerns both backends).

/// SQLite's schema, one migration per version.
pub(crate) const SQLITE: &[&str] = &[
    // 1: the initial schema.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
     CREATE TABLE resources (
         kind TEXT NOT NULL, name TEXT NOT NULL, revision INTEGER NOT NULL, value TEXT NOT NULL,
         PRIMARY KEY (kind, name));
     CREATE TABLE tls_certs (fingerprint TEXT PRIMARY KEY, user TEXT NOT NULL, expires INTEGER NOT NULL);
     CREATE INDEX tls_certs_user ON tls_certs (user);
     CREATE TABLE audit (
         id INTEGER PRIMARY KEY AUTOINCREMENT, time_ms INTEGER NOT NULL, user TEXT NOT NULL,
         action TEXT NOT NULL, resource TEXT NOT NULL, allowed INTEGER NOT NULL,
         error TEXT NOT NULL, peer TEXT NOT NULL);",
    // 2: the policy change feed (roles, users, locks) that proxies watch; written by triggers
    // in the same transaction as the change itself, and pruned to the newest 100,000 entries.
    "CREATE TABLE changes (
         seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
         deleted INTEGER NOT NULL, value TEXT NOT NULL);
     CREATE TRIGGER changes_insert AFTER INSERT ON resources
         WHEN NEW.kind IN ('role', 'user', 'lock') BEGIN
         INSERT INTO changes (kind, name, deleted, value) VALUES (NEW.kind, NEW.name, 0, NEW.value);
     END;
     CREATE TRIGGER changes_update AFTER UPDATE ON resources
         WHEN NEW.kind IN ('role', 'user', 'lock') BEGIN
         INSERT INTO changes (kind, name, deleted, value) VALUES (NEW.kind, NEW.name, 0, NEW.value);
     END;
     CREATE TRIGGER changes_delete AFTER DELETE ON resources
         WHEN OLD.kind IN ('role', 'user', 'lock') BEGIN
         INSERT INTO changes (kind, name, deleted, value) VALUES (OLD.kind, OLD.name, 1, '');
     END;
     CREATE TRIGGER changes_prune AFTER INSERT ON changes BEGIN
         DELETE FROM changes WHERE seq <= NEW.seq - 100000;
     END;",
    // 3: stream access events shipped by proxies (the event as protobuf), unique by id.
    "CREATE TABLE stream_events (
         id TEXT PRIMARY KEY, time_ms INTEGER NOT NULL, user TEXT NOT NULL, data BLOB NOT NULL);
     CREATE INDEX stream_events_time ON stream_events (time_ms);
     CREATE INDEX stream_events_user ON stream_events (user, time_ms);",
    // 4: access requests. They are resources of kind `access_request` (so a review is a
    // conditional write) and join the policy feed, so that proxies learn of approvals; a TLS
    // client certificate may carry the roles of one request.
    "ALTER TABLE tls_certs ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
     DROP TRIGGER changes_insert;
     DROP TRIGGER changes_update;
     DROP TRIGGER changes_delete;
     CREATE TRIGGER changes_insert AFTER INSERT ON resources
         WHEN NEW.kind IN ('role', 'user', 'lock', 'access_request') BEGIN
         INSERT INTO changes (kind, name, deleted, value) VALUES (NEW.kind, NEW.name, 0, NEW.value);
     END;
     CREATE TRIGGER changes_update AFTER UPDATE ON resources
         WHEN NEW.kind IN ('role', 'user', 'lock', 'access_request') BEGIN
         INSERT INTO changes (kind, name, deleted, value) VALUES (NEW.kind, NEW.name, 0, NEW.value);
     END;
     CREATE TRIGGER changes_delete AFTER DELETE ON resources
         WHEN OLD.kind IN ('role', 'user', 'lock', 'access_request') BEGIN
         INSERT INTO changes (kind, name, deleted, value) VALUES (OLD.kind, OLD.name, 1, '');
     END;",
];

/// The advisory lock every writer of the PostgreSQL change feed holds until it commits (one
/// 64-bit key, "postern1" in ASCII).
#[cfg_attr(not(test), allow(dead_code))] // written out in the SQL below; a test checks it
pub(crate) const PG_FEED_LOCK: i64 = 0x706f_7374_6572_6e31;
/// The advisory lock a starting server holds while it migrates ("postern2").
pub(crate) const PG_MIGRATE_LOCK: i64 = 0x706f_7374_6572_6e32;

/// PostgreSQL's schema, one migration per version; version n means the same as SQLite's n.
///
/// The change feed's revisions come from one sequence, so they are global across every Auth
/// server on the database. Its writers take [`PG_FEED_LOCK`] before they draw a revision and keep
/// it until they commit: revisions therefore commit in order, and a watcher that has read
/// revision n will never later find an uncommitted n-1 appear behind it.
pub(crate) const POSTGRES: &[&str] = &[
    // 1: the initial schema.
    r#"CREATE TABLE meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
     CREATE TABLE resources (
         kind TEXT NOT NULL, name TEXT NOT NULL, revision BIGINT NOT NULL, value TEXT NOT NULL,
         PRIMARY KEY (kind, name));
     CREATE TABLE tls_certs (fingerprint TEXT PRIMARY KEY, "user" TEXT NOT NULL, expires BIGINT NOT NULL);
     CREATE INDEX tls_certs_user ON tls_certs ("user");
     CREATE TABLE audit (
         id BIGSERIAL PRIMARY KEY, time_ms BIGINT NOT NULL, "user" TEXT NOT NULL,
         action TEXT NOT NULL, resource TEXT NOT NULL, allowed BOOLEAN NOT NULL,
         error TEXT NOT NULL, peer TEXT NOT NULL);"#,
    // 2: the policy change feed, written by triggers in the writer's transaction, pruned to the
    // newest 100,000 entries.
    r#"CREATE TABLE changes (
         seq BIGSERIAL PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
         deleted BOOLEAN NOT NULL, value TEXT NOT NULL);
     CREATE FUNCTION postern_record_change() RETURNS trigger LANGUAGE plpgsql AS $$
     DECLARE s BIGINT;
     BEGIN
         PERFORM pg_advisory_xact_lock(8101821198418210353);
         IF TG_OP = 'DELETE' THEN
             INSERT INTO changes (kind, name, deleted, value)
                 VALUES (OLD.kind, OLD.name, TRUE, '') RETURNING seq INTO s;
         ELSE
             INSERT INTO changes (kind, name, deleted, value)
                 VALUES (NEW.kind, NEW.name, FALSE, NEW.value) RETURNING seq INTO s;
         END IF;
         DELETE FROM changes WHERE seq <= s - 100000;
         RETURN NULL;
     END $$;
     CREATE TRIGGER changes_write AFTER INSERT OR UPDATE ON resources FOR EACH ROW
         WHEN (NEW.kind IN ('role', 'user', 'lock')) EXECUTE FUNCTION postern_record_change();
     CREATE TRIGGER changes_delete AFTER DELETE ON resources FOR EACH ROW
         WHEN (OLD.kind IN ('role', 'user', 'lock')) EXECUTE FUNCTION postern_record_change();"#,
    // 3: stream access events shipped by proxies (the event as protobuf), unique by id.
    r#"CREATE TABLE stream_events (
         id TEXT PRIMARY KEY, time_ms BIGINT NOT NULL, "user" TEXT NOT NULL, data BYTEA NOT NULL);
     CREATE INDEX stream_events_time ON stream_events (time_ms);
     CREATE INDEX stream_events_user ON stream_events ("user", time_ms);"#,
    // 4: access requests: resources of kind `access_request` join the policy feed; a TLS client
    // certificate may carry the roles of one request.
    r#"ALTER TABLE tls_certs ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
     DROP TRIGGER changes_write ON resources;
     DROP TRIGGER changes_delete ON resources;
     CREATE TRIGGER changes_write AFTER INSERT OR UPDATE ON resources FOR EACH ROW
         WHEN (NEW.kind IN ('role', 'user', 'lock', 'access_request'))
         EXECUTE FUNCTION postern_record_change();
     CREATE TRIGGER changes_delete AFTER DELETE ON resources FOR EACH ROW
         WHEN (OLD.kind IN ('role', 'user', 'lock', 'access_request'))
         EXECUTE FUNCTION postern_record_change();"#,
];

#[cfg(test)]
mod tests {
    #[test]
    fn both_backends_have_the_same_versions_and_the_feed_lock_matches_its_sql() {
        assert_eq!(super::SQLITE.len(), super::POSTGRES.len());
        assert!(super::POSTGRES[1].contains(&super::PG_FEED_LOCK.to_string()));
    }
}
