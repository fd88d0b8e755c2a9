// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AgentRegistryBase} from "./AgentRegistryBase.sol";

/// @title ValidationRegistry: ERC-8004 requests for, and answers from, independent validators.
/// @notice An agent's owner or operator asks a named validator to check some work (request URI + hash);
///         only that validator answers, with a score 0..100, and may answer again (the latest answer
///         stands). Incentives and penalties are outside this registry.
///         Written for mesh402 against the ERC-8004 interface; not upgradeable.
contract ValidationRegistry is AgentRegistryBase {
    struct Status {
        address validatorAddress;
        uint256 agentId;
        uint8 response;
        bytes32 responseHash;
        string tag;
        uint256 lastUpdate;
        bool answered;
    }

    mapping(bytes32 requestHash => Status) private _status;
    mapping(uint256 agentId => bytes32[]) private _byAgent;
    mapping(address validator => bytes32[]) private _byValidator;

    event ValidationRequest(address indexed validatorAddress, uint256 indexed agentId, string requestURI, bytes32 indexed requestHash);
    event ValidationResponse(
        address indexed validatorAddress,
        uint256 indexed agentId,
        bytes32 indexed requestHash,
        uint8 response,
        string responseURI,
        bytes32 responseHash,
        string tag
    );

    error NotAgentOperator(address caller, uint256 agentId);
    error ZeroValidator();
    error RequestExists(bytes32 requestHash);
    error UnknownRequest(bytes32 requestHash);
    error NotValidator(address caller);
    error ResponseOutOfRange(uint8 response);

    constructor(address identityRegistry) AgentRegistryBase(identityRegistry) {}

    function validationRequest(address validatorAddress, uint256 agentId, string calldata requestURI, bytes32 requestHash)
        external
    {
        if (validatorAddress == address(0)) revert ZeroValidator();
        if (!_isAgentOperator(msg.sender, agentId)) revert NotAgentOperator(msg.sender, agentId);
        Status storage s = _status[requestHash];
        if (s.validatorAddress != address(0)) revert RequestExists(requestHash);
        s.validatorAddress = validatorAddress;
        s.agentId = agentId;
        s.lastUpdate = block.timestamp;
        _byAgent[agentId].push(requestHash);
        _byValidator[validatorAddress].push(requestHash);
        emit ValidationRequest(validatorAddress, agentId, requestURI, requestHash);
    }

    function validationResponse(
        bytes32 requestHash,
        uint8 response,
        string calldata responseURI,
        bytes32 responseHash,
        string calldata tag
    ) external {
        Status storage s = _status[requestHash];
        if (s.validatorAddress == address(0)) revert UnknownRequest(requestHash);
        if (msg.sender != s.validatorAddress) revert NotValidator(msg.sender);
        if (response > 100) revert ResponseOutOfRange(response);
        s.response = response;
        s.responseHash = responseHash;
        s.tag = tag;
        s.lastUpdate = block.timestamp;
        s.answered = true;
        emit ValidationResponse(s.validatorAddress, s.agentId, requestHash, response, responseURI, responseHash, tag);
    }

    function getValidationStatus(bytes32 requestHash)
        external
        view
        returns (address validatorAddress, uint256 agentId, uint8 response, bytes32 responseHash, string memory tag, uint256 lastUpdate)
    {
        Status storage s = _status[requestHash];
        if (s.validatorAddress == address(0)) revert UnknownRequest(requestHash);
        return (s.validatorAddress, s.agentId, s.response, s.responseHash, s.tag, s.lastUpdate);
    }

    /// @notice Answered requests for the agent, filtered by validators (none named: all) and tag (empty: any).
    function getSummary(uint256 agentId, address[] calldata validatorAddresses, string calldata tag)
        external
        view
        returns (uint64 count, uint8 avgResponse)
    {
        bytes32 wanted = keccak256(bytes(tag));
        uint256 total = 0;
        bytes32[] storage hashes = _byAgent[agentId];
        for (uint256 i = 0; i < hashes.length; ++i) {
            Status storage s = _status[hashes[i]];
            if (!s.answered) continue;
            if (bytes(tag).length > 0 && keccak256(bytes(s.tag)) != wanted) continue;
            if (validatorAddresses.length > 0 && !_contains(validatorAddresses, s.validatorAddress)) continue;
            count += 1;
            total += s.response;
        }
        if (count > 0) avgResponse = uint8(total / count);
    }

    function getAgentValidations(uint256 agentId) external view returns (bytes32[] memory) {
        return _byAgent[agentId];
    }

    function getValidatorRequests(address validatorAddress) external view returns (bytes32[] memory) {
        return _byValidator[validatorAddress];
    }

    function _contains(address[] calldata list, address who) private pure returns (bool) {
        for (uint256 i = 0; i < list.length; ++i) {
            if (list[i] == who) return true;
        }
        return false;
    }
}
