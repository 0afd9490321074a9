//! HTTP contract tests: a real server on 127.0.0.1:0 over a real embedded
//! store in a temp dir, driven over real HTTP.

mod smoke;
