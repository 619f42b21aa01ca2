//! The CRM upsert handler (SPEC §6). Not built yet: every attempt fails
//! without retry and says so, rather than pretending to deliver.

use async_trait::async_trait;

use super::{AttemptResult, Handler, Job};
use crate::config::CrmSpec;

pub struct Upsert;

impl Upsert {
    pub fn new(_client: reqwest::Client, _spec: &CrmSpec) -> Self {
        Upsert
    }
}

#[async_trait]
impl Handler for Upsert {
    async fn run(&self, _job: Job<'_>) -> AttemptResult {
        AttemptResult::failure("crm_upsert is not implemented in this build")
    }
}
