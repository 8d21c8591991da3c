//! What every service of one emulator instance shares.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::faults::Faults;
use crate::issuer::IssuerCache;
use crate::observe::RequestLog;
use crate::settings::Settings;
use crate::state::State;
use crate::throttle::Throttler;
use crate::tokens::Signer;

/// A token IMDS handed out, kept to hand out again as real IMDS does.
#[derive(Debug, Clone)]
pub struct CachedToken {
    pub access_token: String,
    pub not_before: i64,
    pub expires_on: i64,
    pub client_id: String,
}

#[derive(Debug)]
pub struct Shared {
    pub state: Mutex<State>,
    pub settings: RwLock<Settings>,
    pub throttler: Mutex<Throttler>,
    pub faults: Mutex<Faults>,
    pub log: Mutex<RequestLog>,
    pub signer: Signer,
    /// Keyed by (identity object ID, folded resource).
    pub imds_cache: Mutex<HashMap<(String, String), CachedToken>>,
    /// Federated credential issuers' signing keys, as Entra caches them.
    pub issuers: IssuerCache,
}

/// Locks a mutex; a panic in another holder does not make the data unusable for an emulator.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn now_secs() -> i64 {
    jiff::Timestamp::now().as_second()
}
