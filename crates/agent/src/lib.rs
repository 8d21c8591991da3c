//! The node agent of pod-identity.
//!
//! Pods on an Azure VM reach the Instance Metadata Service (IMDS) at 169.254.169.254 and would get tokens
//! for every identity of the VM. The agent redirects that traffic to itself ([`rules`], [`netfilter`], [`redirect`]),
//! works out which pod is calling from the connection's source address ([`world`], [`watch`]), which of
//! that pod's identities the request names ([`resolve`]), and answers with that identity's token from a
//! node-wide cache ([`cache`], [`tokens`]) filled from IMDS or Entra ID ([`upstream`], [`azure`]; for a
//! federated identity, in exchange for its subject's token from the API server, [`federation`]), in the
//! exact shape IMDS uses ([`response`]), so that every SDK works unchanged.
//!
//! Decisions are plain functions over plain data ([`rules`], [`request`], [`resolve`], the freshness rules
//! of [`cache`]); the modules around them only list, watch, fetch and serve.

pub mod attest;
pub mod audit;
pub mod azure;
pub mod cache;
pub mod clock;
pub mod config;
pub mod connections;
pub mod credentials;
pub mod events;
pub mod federation;
pub mod health;
pub mod metrics;
pub mod netfilter;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod request;
pub mod resolve;
pub mod response;
pub mod rules;
pub mod run;
pub mod server;
pub mod taint;
pub mod tokens;
pub mod upstream;
pub mod watch;
pub mod world;

pub use config::Args;
pub use run::{Agent, Parts, StartError, run, start};
