// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

interface IAgentIdentity {
    function isAuthorizedOrOwner(address spender, uint256 agentId) external view returns (bool);
    function ownerOf(uint256 agentId) external view returns (address);
    function getAgentWallet(uint256 agentId) external view returns (address);
}

/// @title AgentRegistryBase: what the ERC-8004 Reputation and Validation registries share: the Identity
///        registry they are bound to at deployment, and the interface version they implement.
abstract contract AgentRegistryBase {
    address internal immutable _identity;

    constructor(address identityRegistry) {
        _identity = identityRegistry;
    }

    function getIdentityRegistry() external view returns (address) {
        return _identity;
    }

    function getVersion() external pure returns (string memory) {
        return "2.0.0";
    }

    /// True when `who` is the agent's owner or an approved operator.
    function _isAgentOperator(address who, uint256 agentId) internal view returns (bool) {
        return IAgentIdentity(_identity).isAuthorizedOrOwner(who, agentId);
    }
}
