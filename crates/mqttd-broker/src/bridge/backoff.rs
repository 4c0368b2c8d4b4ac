//! How long a bridge waits before it tries to connect again: mqttd-proto's exponential
//! backoff with jitter, so that bridges cut off together (a remote broker's restart) do not
//! come back in step.

pub(crate) use mqttd_proto::backoff::Backoff;

/// A random number in `[0, 1)`, for the jitter.
pub(crate) fn unit() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    mqttd_proto::backoff::unit_from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_in_range() {
        for _ in 0..1000 {
            let u = unit();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}
