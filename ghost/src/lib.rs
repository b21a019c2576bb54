//! Ghost processes.
