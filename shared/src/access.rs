//! Who may touch which keys: one etcd role per service, with the least privilege on the key
//! prefixes of [`Keyspace`] under the namespace.
//!
//! etcd's RBAC grants `read`, `write` or `readwrite` on a key range; a compare in a transaction
//! needs `read` on its key, a put or delete `write`, and both branches of a transaction are
//! checked whichever runs. Each service's grants below are what its code really reads and
//! writes (a test checks every key it builds against them); `telemetry-admin auth setup`
//! creates them and the operations guide prints the same table.
//!
//! Leases need no permission to grant or keep alive. Revoking one needs `write` on every key
//! attached to it, and so does attaching a key to a lease that holds keys the user cannot write:
//! each service attaches keys only to leases it granted itself, on prefixes it writes.

use serde::Serialize;

use crate::keys::Keyspace;

/// A binary of the pipeline that connects to etcd as its own user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    /// `telemetry-streamer`: enqueues rows.
    Streamer,
    /// `telemetry-collector`: stores what is queued.
    Collector,
    /// `telemetry-gateway`: serves what is stored (read-only).
    Gateway,
    /// `telemetry-exporter`: sends what is stored to a TSDB.
    Exporter,
    /// `telemetry-admin` for routine operations (queue, dead letters, audit, status).
    Admin,
}

impl Service {
    /// Every service, in the order the tables list them.
    pub const ALL: [Service; 5] = [
        Service::Streamer,
        Service::Collector,
        Service::Gateway,
        Service::Exporter,
        Service::Admin,
    ];

    /// The service's short name (`streamer`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Service::Streamer => "streamer",
            Service::Collector => "collector",
            Service::Gateway => "gateway",
            Service::Exporter => "exporter",
            Service::Admin => "admin",
        }
    }

    /// The service named `name`, if any.
    pub fn from_name(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a grant allows on its prefix (etcd's permission types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Range reads, watches, and compares in transactions.
    Read,
    /// Puts and deletes.
    Write,
    /// Both.
    ReadWrite,
}

impl Access {
    /// etcd's name for it (`read`, `write`, `readwrite`).
    pub fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "readwrite",
        }
    }

    /// Does this access include reading?
    pub fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    /// Does this access include writing?
    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One permission of a service's role: `access` on every key starting with `prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// The key prefix, namespace included.
    pub prefix: String,
    /// What is allowed there.
    pub access: Access,
    /// Why the service needs it.
    pub why: &'static str,
}

/// The grants of `service`'s role under the namespace of `keys`.
pub fn grants(service: Service, keys: &Keyspace) -> Vec<Grant> {
    use Access::{Read, ReadWrite};
    let grant = |prefix: String, access: Access, why: &'static str| Grant { prefix, access, why };
    match service {
        Service::Streamer => vec![
            grant(
                keys.queue_prefix(),
                ReadWrite,
                "enqueues rows; counts the queue depth for backpressure",
            ),
            grant(
                keys.dedup_prefix(),
                ReadWrite,
                "writes each scraped sample's dedup marker, compared to refuse a repeat",
            ),
            grant(
                keys.profiles_prefix(),
                ReadWrite,
                "writes the profiles its entries name",
            ),
            grant(
                keys.streams_prefix(),
                ReadWrite,
                "its checkpoint (read at start and fenced in every batch) and origin",
            ),
        ],
        Service::Collector => vec![
            grant(
                keys.queue_prefix(),
                ReadWrite,
                "reads its partitions, removes what it stored",
            ),
            grant(
                keys.dedup_prefix(),
                ReadWrite,
                "compares markers; claims one for producers that write none",
            ),
            grant(keys.data_prefix(), ReadWrite, "stores records"),
            grant(keys.gpu_index_prefix(), ReadWrite, "the GPU index"),
            grant(keys.host_index_prefix(), ReadWrite, "the host index"),
            grant(
                keys.profiles_prefix(),
                ReadWrite,
                "reads profiles; writes those of other producers' entries",
            ),
            grant(
                keys.stats_prefix(),
                ReadWrite,
                "per-partition counters, fenced in every commit",
            ),
            grant(keys.deadletter_prefix(), ReadWrite, "dead letters"),
            grant(
                keys.collectors_prefix(),
                ReadWrite,
                "membership and partition ownership",
            ),
        ],
        Service::Gateway => vec![
            grant(keys.data_prefix(), Read, "serves and follows records"),
            grant(keys.gpu_index_prefix(), Read, "lists GPUs"),
            grant(keys.host_index_prefix(), Read, "lists hosts"),
            grant(keys.profiles_prefix(), Read, "decodes lean records"),
            grant(keys.stats_prefix(), Read, "totals"),
            grant(keys.queue_prefix(), Read, "counts the queue depth"),
            grant(keys.deadletter_prefix(), Read, "counts dead letters"),
        ],
        Service::Exporter => vec![
            grant(keys.data_prefix(), Read, "follows and exports records"),
            grant(keys.profiles_prefix(), Read, "decodes lean records"),
            grant(keys.stats_prefix(), Read, "counts what is stored"),
            grant(
                keys.exporters_prefix(),
                ReadWrite,
                "its owner key, checkpoint and rejected records",
            ),
        ],
        Service::Admin => vec![
            grant(
                namespace_prefix(keys),
                Read,
                "reports and audits every part of the pipeline",
            ),
            grant(
                keys.queue_prefix(),
                ReadWrite,
                "dead-letter replay puts entries back",
            ),
            grant(
                keys.dedup_prefix(),
                ReadWrite,
                "replay moves an entry's dedup marker",
            ),
            grant(
                keys.deadletter_prefix(),
                ReadWrite,
                "dead-letter replay and purge",
            ),
        ],
    }
}

/// Every key of the pipeline: the namespace and a `/` (or `/` alone without a namespace).
pub fn namespace_prefix(keys: &Keyspace) -> String {
    format!("{}/", keys.namespace())
}

/// Does some grant of `grants` allow `wanted` on `key`?
pub fn allows(grants: &[Grant], key: &str, wanted: Access) -> bool {
    let (read, write) = (wanted.reads(), wanted.writes());
    let covering: Vec<&Grant> = grants.iter().filter(|g| key.starts_with(&g.prefix)).collect();
    (!read || covering.iter().any(|g| g.access.reads()))
        && (!write || covering.iter().any(|g| g.access.writes()))
}

/// The table of every service's grants as Markdown (the operations guide holds this table).
pub fn markdown_table(keys: &Keyspace) -> String {
    let mut out = String::from("| service | prefix | access | why |\n|---|---|---|---|\n");
    for service in Service::ALL {
        for g in grants(service, keys) {
            out.push_str(&format!(
                "| {service} | `{}` | {} | {} |\n",
                g.prefix, g.access, g.why
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn keys() -> Keyspace {
        Keyspace::new("/prod")
    }

    /// A key of every kind the layout has, with the services that write it.
    fn written_keys(k: &Keyspace) -> Vec<(String, &'static [Service])> {
        use Service::{Admin, Collector, Streamer};
        vec![
            (k.queue_entry(3, "01J"), &[Streamer, Collector, Admin]),
            (k.dedup_marker(ID), &[Streamer, Collector, Admin]),
            (format!("{}x", k.profiles_prefix()), &[Streamer, Collector]),
            (k.stream_checkpoint("dcgm-w0"), &[Streamer]),
            (k.stream_origin("dcgm-w0"), &[Streamer]),
            (
                k.data_record("h", "0", "2026-01-01T00:00:00.000000Z", "01J"),
                &[Collector],
            ),
            (k.deadletter("01J"), &[Collector, Admin]),
            (k.member("c0"), &[Collector]),
            (k.owner(3), &[Collector]),
            (k.gpu_index("GPU-1"), &[Collector]),
            (k.host_index("h"), &[Collector]),
            (k.partition_stats(3), &[Collector]),
            (k.exporter_checkpoint("e"), &[Service::Exporter]),
        ]
    }

    #[test]
    fn each_service_writes_exactly_the_keys_it_should() {
        let k = keys();
        for service in Service::ALL {
            let g = grants(service, &k);
            for (key, writers) in written_keys(&k) {
                assert_eq!(
                    allows(&g, &key, Access::Write),
                    writers.contains(&service),
                    "{service} writing {key}"
                );
            }
        }
    }

    #[test]
    fn the_required_limits_hold() {
        let k = keys();
        let gateway = grants(Service::Gateway, &k);
        assert!(
            gateway.iter().all(|g| g.access == Access::Read),
            "the gateway is read-only"
        );
        let streamer = grants(Service::Streamer, &k);
        let data = k.data_record("h", "0", "2026-01-01T00:00:00.000000Z", "01J");
        assert!(!allows(&streamer, &data, Access::Read) && !allows(&streamer, &data, Access::Write));
        let collector = grants(Service::Collector, &k);
        let checkpoint = k.stream_checkpoint("s");
        assert!(
            !allows(&collector, &checkpoint, Access::Read) && !allows(&collector, &checkpoint, Access::Write)
        );
        // Nothing reaches outside the namespace.
        for service in Service::ALL {
            for g in grants(service, &k) {
                assert!(g.prefix.starts_with("/prod/"), "{service}: {}", g.prefix);
            }
        }
        let other = Keyspace::new("/other");
        assert!(!allows(
            &grants(Service::Admin, &k),
            &other.queue_prefix(),
            Access::Read
        ));
    }

    #[test]
    fn the_reads_each_service_makes_are_granted() {
        let k = keys();
        let reads: [(Service, Vec<String>); 3] = [
            (
                Service::Streamer,
                vec![k.queue_prefix(), k.stream_checkpoint("s")],
            ),
            (
                Service::Collector,
                vec![
                    k.queue_partition_prefix(1),
                    k.owners_prefix(),
                    k.members_prefix(),
                    k.data_prefix(),
                ],
            ),
            (
                Service::Gateway,
                vec![
                    k.gpu_data_prefix("h", "0"),
                    k.gpu_index_prefix(),
                    k.stats_prefix(),
                    k.queue_prefix(),
                    k.deadletter_prefix(),
                    k.profiles_prefix(),
                ],
            ),
        ];
        for (service, keys_read) in reads {
            let g = grants(service, &k);
            for key in keys_read {
                assert!(allows(&g, &key, Access::Read), "{service} reading {key}");
            }
        }
        let admin = grants(Service::Admin, &k);
        for (key, _) in written_keys(&k) {
            assert!(allows(&admin, &key, Access::Read), "admin reading {key}");
        }
    }

    #[test]
    fn names_and_table() {
        for service in Service::ALL {
            assert_eq!(Service::from_name(service.name()), Some(service));
        }
        assert_eq!(namespace_prefix(&Keyspace::new("")), "/");
        let table = markdown_table(&Keyspace::new(""));
        assert!(
            table.contains("| gateway | `/telemetry/data/` | read | serves and follows records |\n"),
            "{table}"
        );
    }

    #[test]
    fn the_operations_guide_has_the_table() {
        let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md"))
            .expect("docs/operations.md");
        let table = markdown_table(&Keyspace::new(""));
        assert!(
            guide.contains(&table),
            "docs/operations.md lacks the current roles table (ETCD_NAMESPACE empty):\n{table}"
        );
    }
}
