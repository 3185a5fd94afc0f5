//! Telemetry partitioning, shared by every backend so that all nodes and consumers agree.

/// The telemetry partition of `device` among `partitions` (`0` counts as one).
///
/// FNV-1a (32-bit) of the ID's bytes, modulo `partitions`: stable across processes, builds
/// and backends, unlike std's randomly seeded hasher, so a device's records always land in
/// the same stream partition whichever node accepted them.
pub fn partition_for(device: &str, partitions: u32) -> u32 {
    const OFFSET_BASIS: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let hash = device
        .bytes()
        .fold(OFFSET_BASIS, |h, b| (h ^ u32::from(b)).wrapping_mul(PRIME));
    hash % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::partition_for;

    #[test]
    fn fnv1a_reference_values() {
        // FNV-1a 32 reference vectors: "" -> 0x811c9dc5, "a" -> 0xe40c292c, "foobar" -> 0xbf9cf968.
        assert_eq!(partition_for("", u32::MAX), 0x811c_9dc5);
        assert_eq!(partition_for("a", u32::MAX), 0xe40c_292c);
        assert_eq!(partition_for("foobar", u32::MAX), 0xbf9c_f968);
        assert_eq!(partition_for("a", 4), 0xe40c_292c % 4);
    }

    #[test]
    fn zero_partitions_is_one() {
        assert_eq!(partition_for("sensor-001", 0), 0);
        assert_eq!(partition_for("sensor-001", 1), 0);
    }
}
