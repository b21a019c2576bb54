//! KerFS client library.
