//! `auth setup`: etcd's users and roles for the pipeline, one role and one user per service
//! with the least privilege of [`telemetry_shared::access`], created idempotently.
//!
//! Each step looks before it writes, so a second run changes nothing and reports what exists:
//! - the `root` role and the `root` user holding it (etcd refuses `auth enable` without them);
//! - per service, a role whose permissions are made exactly the service's grants (missing ones
//!   granted, others revoked) and a user holding that role;
//! - optionally, authentication turned on.
//!
//! A user that does not exist yet gets the password in `{password dir}/{user}` if that file
//! exists, else a new random one written there (mode 0600). An existing user's password is never
//! changed. Passwords are never printed.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use etcd_client::{Client, Permission, PermissionType, RoleRevokePermissionOptions};
use serde::Serialize;
use telemetry_shared::{
    Keyspace,
    access::{self, Access, Service},
    keys::prefix_end,
};

use crate::AdminError;

/// etcd's superuser and its role, which must exist before authentication is enabled.
pub const ROOT: &str = "root";

/// What `auth setup` is asked to do.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// Where new users' passwords are taken from or written to (`{dir}/{user}`).
    pub password_dir: Option<PathBuf>,
    /// Put before each service's name to make its user and role name (`telemetry-` gives
    /// `telemetry-streamer`).
    pub name_prefix: String,
    /// Turn authentication on at the end.
    pub enable: bool,
}

/// The user and role name prefix for a namespace: `telemetry-` without one, else
/// `telemetry-{namespace with / as -}-`, so pipelines sharing one etcd get distinct roles.
pub fn default_name_prefix(keys: &Keyspace) -> String {
    let ns: Vec<&str> = keys.namespace().split('/').filter(|s| !s.is_empty()).collect();
    if ns.is_empty() {
        "telemetry-".into()
    } else {
        format!("telemetry-{}-", ns.join("-"))
    }
}

/// One user, as found or created.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UserLine {
    /// The user (and its role) name.
    pub user: String,
    /// The role it holds.
    pub role: String,
    /// The service it is for (`root` for the superuser).
    pub service: String,
    /// `created` or `exists`.
    pub status: String,
    /// Where its password came from: `generated` or `from file` (with the file), or
    /// `unchanged` for a user that existed.
    pub password: String,
}

/// One permission of a role, as found or changed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GrantLine {
    /// The role.
    pub role: String,
    /// The key prefix.
    pub prefix: String,
    /// `read`, `write` or `readwrite`.
    pub access: String,
    /// `granted` (new or changed), `exists`, or `revoked` (held but not needed).
    pub status: String,
    /// Why the service needs it (empty for a revoked one).
    pub why: String,
}

/// What `auth setup` found and did.
#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    /// Users, `root` first.
    pub users: Vec<UserLine>,
    /// Every service role's permissions.
    pub grants: Vec<GrantLine>,
    /// `enabled` (it was already), `enabled now`, or `disabled`.
    pub authentication: String,
}

/// Creates what is missing; see the module docs.
pub async fn setup(
    client: &Client,
    keys: &Keyspace,
    options: &SetupOptions,
) -> Result<SetupReport, AdminError> {
    let mut client = client.clone();
    let was_enabled = auth_enabled(&client).await?;
    let passwords = Passwords(options.password_dir.as_deref());
    let mut users = Vec::new();
    ensure_role(&mut client, ROOT).await?;
    users.push(ensure_user(&mut client, ROOT, ROOT, "root", &passwords).await?);
    let mut grants = Vec::new();
    for service in Service::ALL {
        let name = format!("{}{}", options.name_prefix, service.name());
        ensure_role(&mut client, &name).await?;
        grants.extend(reconcile(&mut client, &name, &access::grants(service, keys)).await?);
        users.push(ensure_user(&mut client, &name, &name, service.name(), &passwords).await?);
    }
    let authentication = match (was_enabled, options.enable) {
        (true, _) => "enabled",
        (false, true) => {
            client.auth_enable().await?;
            "enabled now"
        }
        (false, false) => "disabled",
    };
    Ok(SetupReport {
        users,
        grants,
        authentication: authentication.into(),
    })
}

/// Is authentication on? etcd answers an authentication attempt with "authentication is not
/// enabled" when it is off (and with a refusal of these empty credentials when it is on).
pub async fn auth_enabled(client: &Client) -> Result<bool, AdminError> {
    match client
        .auth_client()
        .authenticate(String::new(), String::new())
        .await
    {
        Err(etcd_client::Error::GRpcStatus(status))
            if status.message().contains("authentication is not enabled") =>
        {
            Ok(false)
        }
        Err(etcd_client::Error::GRpcStatus(status))
            if matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::PermissionDenied
            ) =>
        {
            Ok(true)
        }
        Err(other) => Err(other.into()),
        Ok(_) => Ok(true),
    }
}

fn not_found(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(s) if s.message().contains("not found"))
}

async fn ensure_role(client: &mut Client, role: &str) -> Result<(), AdminError> {
    match client.role_get(role).await {
        Ok(_) => Ok(()),
        Err(err) if not_found(&err) => {
            client.role_add(role).await?;
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

/// Where passwords of new users come from and go.
struct Passwords<'a>(Option<&'a Path>);

impl Passwords<'_> {
    /// The password for new user `user` and where it came from: the file if it exists, else a
    /// new random one written to it.
    fn for_new_user(&self, user: &str) -> Result<(String, String), AdminError> {
        let Some(dir) = self.0 else {
            return Err(AdminError::Usage(format!(
                "user {user:?} does not exist: pass --password-dir DIR to create it (its password \
                 is taken from DIR/{user}, or generated and written there)"
            )));
        };
        let path = dir.join(user);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let password = text.lines().next().unwrap_or_default().to_string();
                if password.is_empty() {
                    return Err(AdminError::Usage(format!(
                        "{} holds no password on its first line",
                        path.display()
                    )));
                }
                Ok((password, format!("from file {}", path.display())))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let password = generate_password()?;
                write_secret(dir, &path, &password)?;
                Ok((password, format!("generated, written to {}", path.display())))
            }
            Err(err) => Err(AdminError::Usage(format!(
                "cannot read {}: {err}",
                path.display()
            ))),
        }
    }
}

/// 32 random bytes as base64url (43 characters).
fn generate_password() -> Result<String, AdminError> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|err| AdminError::Usage(format!("no randomness for a password: {err}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Writes `secret` to a new file `path` readable by its owner only (in `dir`, created 0700).
fn write_secret(dir: &Path, path: &Path, secret: &str) -> Result<(), AdminError> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let fail = |err: std::io::Error| AdminError::Usage(format!("cannot write {}: {err}", path.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.write_all(format!("{secret}\n").as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)
}

async fn ensure_user(
    client: &mut Client,
    user: &str,
    role: &str,
    service: &str,
    passwords: &Passwords<'_>,
) -> Result<UserLine, AdminError> {
    let line = |status: &str, password: String| UserLine {
        user: user.into(),
        role: role.into(),
        service: service.into(),
        status: status.into(),
        password,
    };
    match client.user_get(user).await {
        Ok(found) => {
            if !found.roles().iter().any(|r| r == role) {
                client.user_grant_role(user, role).await?;
            }
            Ok(line("exists", "unchanged".into()))
        }
        Err(err) if not_found(&err) => {
            let (password, source) = passwords.for_new_user(user)?;
            client.user_add(user, password, None).await?;
            client.user_grant_role(user, role).await?;
            Ok(line("created", source))
        }
        Err(err) => Err(err.into()),
    }
}

fn permission_type(access: Access) -> PermissionType {
    match access {
        Access::Read => PermissionType::Read,
        Access::Write => PermissionType::Write,
        Access::ReadWrite => PermissionType::Readwrite,
    }
}

fn access_of(perm_type: i32) -> String {
    match PermissionType::try_from(perm_type) {
        Ok(PermissionType::Read) => "read".into(),
        Ok(PermissionType::Write) => "write".into(),
        Ok(PermissionType::Readwrite) => "readwrite".into(),
        Err(_) => format!("type {perm_type}"),
    }
}

/// Makes `role`'s permissions exactly `grants` (each on its whole prefix).
async fn reconcile(
    client: &mut Client,
    role: &str,
    grants: &[access::Grant],
) -> Result<Vec<GrantLine>, AdminError> {
    let held = client.role_get(role).await?.0.perm;
    let mut lines = Vec::new();
    for grant in grants {
        let (key, end) = (grant.prefix.as_bytes(), prefix_end(&grant.prefix));
        let wanted = permission_type(grant.access) as i32;
        let exists = held
            .iter()
            .any(|p| p.key == key && p.range_end == end && p.perm_type == wanted);
        if !exists {
            let permission = Permission::new(permission_type(grant.access), key.to_vec()).with_range_end(end);
            client.role_grant_permission(role, permission).await?;
        }
        lines.push(GrantLine {
            role: role.into(),
            prefix: grant.prefix.clone(),
            access: grant.access.name().into(),
            status: if exists { "exists" } else { "granted" }.into(),
            why: grant.why.into(),
        });
    }
    for perm in &held {
        let wanted = grants
            .iter()
            .any(|g| g.prefix.as_bytes() == perm.key.as_slice() && prefix_end(&g.prefix) == perm.range_end);
        if !wanted {
            let options = RoleRevokePermissionOptions::new().with_range_end(perm.range_end.clone());
            client
                .role_revoke_permission(role, perm.key.clone(), Some(options))
                .await?;
            lines.push(GrantLine {
                role: role.into(),
                prefix: String::from_utf8_lossy(&perm.key).into_owned(),
                access: access_of(perm.perm_type),
                status: "revoked".into(),
                why: String::new(),
            });
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_prefixes_follow_the_namespace() {
        assert_eq!(default_name_prefix(&Keyspace::new("")), "telemetry-");
        assert_eq!(default_name_prefix(&Keyspace::new("/prod")), "telemetry-prod-");
        assert_eq!(default_name_prefix(&Keyspace::new("/a/b/")), "telemetry-a-b-");
    }

    #[test]
    fn passwords_are_taken_from_files_or_generated_into_new_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let passwords = Passwords(Some(dir.path()));
        std::fs::write(dir.path().join("given"), "p4ss\n").expect("write");
        let (given, source) = passwords.for_new_user("given").expect("read");
        assert_eq!(given, "p4ss");
        assert!(source.starts_with("from file"), "{source}");
        let (made, source) = passwords.for_new_user("new").expect("generated");
        assert_eq!(made.len(), 43);
        assert!(source.starts_with("generated"), "{source}");
        let path = dir.path().join("new");
        assert_eq!(
            std::fs::read_to_string(&path).expect("written"),
            format!("{made}\n")
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(Passwords(None).for_new_user("x").is_err());
    }
}
