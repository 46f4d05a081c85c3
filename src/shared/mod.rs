//! State shared by the nodes of a cluster (`shared_state`).

pub mod redis;
