//! Customers, each in one region.

use factline_aggregate::{tagged_events, Aggregate};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub registered: bool,
    pub name: String,
    pub region: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum CustomerEvent {
    CustomerRegistered { name: String, region: String },
    CustomerRelocated { from: String, to: String },
}

tagged_events!(CustomerEvent);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CustomerCommand {
    Register { name: String, region: String },
    Relocate { region: String },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CustomerError {
    #[error("the customer is already registered")]
    AlreadyRegistered,
    #[error("the customer is not registered")]
    NotRegistered,
    #[error("a customer needs a name")]
    NoName,
    #[error("a customer needs a region")]
    NoRegion,
    #[error("the customer is already in region {0}")]
    AlreadyInRegion(String),
}

impl Aggregate for Customer {
    const CATEGORY: &'static str = "Customer";
    type Event = CustomerEvent;
    type Command = CustomerCommand;
    type Error = CustomerError;

    fn apply(&mut self, event: &CustomerEvent) {
        match event {
            CustomerEvent::CustomerRegistered { name, region } => {
                self.registered = true;
                self.name = name.clone();
                self.region = region.clone();
            }
            CustomerEvent::CustomerRelocated { to, .. } => self.region = to.clone(),
        }
    }

    fn decide(&self, command: &CustomerCommand) -> Result<Vec<CustomerEvent>, CustomerError> {
        match command {
            CustomerCommand::Register { .. } if self.registered => {
                Err(CustomerError::AlreadyRegistered)
            }
            CustomerCommand::Register { name, .. } if name.trim().is_empty() => {
                Err(CustomerError::NoName)
            }
            CustomerCommand::Register { region, .. } if region.trim().is_empty() => {
                Err(CustomerError::NoRegion)
            }
            CustomerCommand::Register { name, region } => {
                Ok(vec![CustomerEvent::CustomerRegistered {
                    name: name.trim().to_owned(),
                    region: region.trim().to_owned(),
                }])
            }
            CustomerCommand::Relocate { .. } if !self.registered => {
                Err(CustomerError::NotRegistered)
            }
            CustomerCommand::Relocate { region } if region.trim().is_empty() => {
                Err(CustomerError::NoRegion)
            }
            CustomerCommand::Relocate { region } if region.trim() == self.region => {
                Err(CustomerError::AlreadyInRegion(self.region.clone()))
            }
            CustomerCommand::Relocate { region } => Ok(vec![CustomerEvent::CustomerRelocated {
                from: self.region.clone(),
                to: region.trim().to_owned(),
            }]),
        }
    }
}
