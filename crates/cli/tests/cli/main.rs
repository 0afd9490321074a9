//! Tests of the `coatcheck` binary as users and operators run it: real
//! processes, real signals, real HTTP.

mod bench;
mod commands;
mod crash;
mod multinode;
mod proc;
mod replies;
mod security;
mod worker;
