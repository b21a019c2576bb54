//! KerFS metadata service.
