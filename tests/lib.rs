//! Helpers for cluster-level tests.
