// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AgentRegistryBase} from "./AgentRegistryBase.sol";

/// @title ReputationRegistry: ERC-8004 client feedback about agents.
/// @notice Any account except the agent's owner or its approved operators may leave feedback: a signed
///         fixed-point value (`value` / 10^valueDecimals) with two tags, an endpoint, and an off-chain file
///         (URI + hash). Feedback is indexed per (agent, client) from 1. A client may revoke its own
///         feedback; anyone may append responses to it. `getSummary` averages the non-revoked feedback of
///         the named clients (naming them is required, which limits Sybil summaries).
///         Written for mesh402 against the ERC-8004 interface; not upgradeable.
contract ReputationRegistry is AgentRegistryBase {
    int128 private constant VALUE_LIMIT = 1e38;

    struct Entry {
        int128 value;
        uint8 valueDecimals;
        bool isRevoked;
        string tag1;
        string tag2;
    }

    mapping(uint256 agentId => mapping(address client => mapping(uint64 index => Entry))) private _entries;
    mapping(uint256 agentId => mapping(address client => uint64)) private _lastIndex;
    mapping(uint256 agentId => address[]) private _clients;
    mapping(uint256 agentId => mapping(address client => bool)) private _isClient;
    // responses: agent => client => index => responders, and a count per responder
    mapping(uint256 => mapping(address => mapping(uint64 => address[]))) private _responders;
    mapping(uint256 => mapping(address => mapping(uint64 => mapping(address => uint64)))) private _responses;

    event NewFeedback(
        uint256 indexed agentId,
        address indexed clientAddress,
        uint64 feedbackIndex,
        int128 value,
        uint8 valueDecimals,
        string indexed indexedTag1,
        string tag1,
        string tag2,
        string endpoint,
        string feedbackURI,
        bytes32 feedbackHash
    );
    event FeedbackRevoked(uint256 indexed agentId, address indexed clientAddress, uint64 indexed feedbackIndex);
    event ResponseAppended(
        uint256 indexed agentId,
        address indexed clientAddress,
        uint64 feedbackIndex,
        address indexed responder,
        string responseURI,
        bytes32 responseHash
    );

    error SelfFeedback(address caller, uint256 agentId);
    error BadValue();
    error NoSuchFeedback(uint256 agentId, address client, uint64 index);
    error AlreadyRevoked();
    error EmptyResponseURI();
    error ClientsRequired();

    constructor(address identityRegistry) AgentRegistryBase(identityRegistry) {}

    // ---- writes -------------------------------------------------------------------------------

    function giveFeedback(
        uint256 agentId,
        int128 value,
        uint8 valueDecimals,
        string calldata tag1,
        string calldata tag2,
        string calldata endpoint,
        string calldata feedbackURI,
        bytes32 feedbackHash
    ) external {
        if (valueDecimals > 18 || value > VALUE_LIMIT || value < -VALUE_LIMIT) revert BadValue();
        // also reverts for an agent that does not exist
        if (_isAgentOperator(msg.sender, agentId)) revert SelfFeedback(msg.sender, agentId);
        uint64 index = _store(agentId, value, valueDecimals, tag1, tag2);
        emit NewFeedback(agentId, msg.sender, index, value, valueDecimals, tag1, tag1, tag2, endpoint, feedbackURI, feedbackHash);
    }

    function revokeFeedback(uint256 agentId, uint64 feedbackIndex) external {
        Entry storage e = _entry(agentId, msg.sender, feedbackIndex);
        if (e.isRevoked) revert AlreadyRevoked();
        e.isRevoked = true;
        emit FeedbackRevoked(agentId, msg.sender, feedbackIndex);
    }

    function appendResponse(
        uint256 agentId,
        address clientAddress,
        uint64 feedbackIndex,
        string calldata responseURI,
        bytes32 responseHash
    ) external {
        if (bytes(responseURI).length == 0) revert EmptyResponseURI();
        _entry(agentId, clientAddress, feedbackIndex);
        mapping(address => uint64) storage counts = _responses[agentId][clientAddress][feedbackIndex];
        if (counts[msg.sender] == 0) _responders[agentId][clientAddress][feedbackIndex].push(msg.sender);
        counts[msg.sender] += 1;
        emit ResponseAppended(agentId, clientAddress, feedbackIndex, msg.sender, responseURI, responseHash);
    }

    // ---- reads --------------------------------------------------------------------------------

    function getLastIndex(uint256 agentId, address clientAddress) external view returns (uint64) {
        return _lastIndex[agentId][clientAddress];
    }

    function getClients(uint256 agentId) external view returns (address[] memory) {
        return _clients[agentId];
    }

    function readFeedback(uint256 agentId, address clientAddress, uint64 feedbackIndex)
        external
        view
        returns (int128 value, uint8 valueDecimals, string memory tag1, string memory tag2, bool isRevoked)
    {
        Entry storage e = _entry(agentId, clientAddress, feedbackIndex);
        return (e.value, e.valueDecimals, e.tag1, e.tag2, e.isRevoked);
    }

    /// @notice Mean of the matching, non-revoked feedback, expressed at the largest decimals seen.
    function getSummary(uint256 agentId, address[] calldata clientAddresses, string calldata tag1, string calldata tag2)
        external
        view
        returns (uint64 count, int128 summaryValue, uint8 summaryValueDecimals)
    {
        if (clientAddresses.length == 0) revert ClientsRequired();
        bytes32 t1 = keccak256(bytes(tag1));
        bytes32 t2 = keccak256(bytes(tag2));
        int256 sum18; // every value scaled to 18 decimals
        for (uint256 c = 0; c < clientAddresses.length; ++c) {
            address client = clientAddresses[c];
            uint64 last = _lastIndex[agentId][client];
            for (uint64 i = 1; i <= last; ++i) {
                Entry storage e = _entries[agentId][client][i];
                if (e.isRevoked || !_tagsMatch(e, tag1, tag2, t1, t2)) continue;
                count += 1;
                sum18 += int256(e.value) * int256(10 ** (18 - e.valueDecimals));
                if (e.valueDecimals > summaryValueDecimals) summaryValueDecimals = e.valueDecimals;
            }
        }
        if (count > 0) {
            summaryValue = int128(sum18 / int256(uint256(count)) / int256(10 ** (18 - summaryValueDecimals)));
        }
    }

    /// @notice Every matching feedback entry as parallel arrays; no clients named means all of them.
    function readAllFeedback(
        uint256 agentId,
        address[] calldata clientAddresses,
        string calldata tag1,
        string calldata tag2,
        bool includeRevoked
    )
        external
        view
        returns (
            address[] memory clients,
            uint64[] memory feedbackIndexes,
            int128[] memory values,
            uint8[] memory valueDecimals,
            string[] memory tag1s,
            string[] memory tag2s,
            bool[] memory revokedStatuses
        )
    {
        address[] memory who = clientAddresses;
        if (who.length == 0) who = _clients[agentId];
        uint256 n = _countMatching(agentId, who, tag1, tag2, includeRevoked);
        clients = new address[](n);
        feedbackIndexes = new uint64[](n);
        values = new int128[](n);
        valueDecimals = new uint8[](n);
        tag1s = new string[](n);
        tag2s = new string[](n);
        revokedStatuses = new bool[](n);
        uint256 k = 0;
        bytes32 t1 = keccak256(bytes(tag1));
        bytes32 t2 = keccak256(bytes(tag2));
        for (uint256 c = 0; c < who.length; ++c) {
            uint64 last = _lastIndex[agentId][who[c]];
            for (uint64 i = 1; i <= last; ++i) {
                Entry storage e = _entries[agentId][who[c]][i];
                if ((e.isRevoked && !includeRevoked) || !_tagsMatch(e, tag1, tag2, t1, t2)) continue;
                clients[k] = who[c];
                feedbackIndexes[k] = i;
                values[k] = e.value;
                valueDecimals[k] = e.valueDecimals;
                tag1s[k] = e.tag1;
                tag2s[k] = e.tag2;
                revokedStatuses[k] = e.isRevoked;
                ++k;
            }
        }
    }

    /// @notice Responses appended: a zero client means every client, index 0 every feedback of a client,
    ///         and no responders named means all responders.
    function getResponseCount(uint256 agentId, address clientAddress, uint64 feedbackIndex, address[] calldata responders)
        external
        view
        returns (uint64 count)
    {
        address[] memory who;
        if (clientAddress == address(0)) {
            who = _clients[agentId];
        } else {
            who = new address[](1);
            who[0] = clientAddress;
        }
        for (uint256 c = 0; c < who.length; ++c) {
            uint64 first = feedbackIndex == 0 ? 1 : feedbackIndex;
            uint64 last = feedbackIndex == 0 ? _lastIndex[agentId][who[c]] : feedbackIndex;
            for (uint64 i = first; i <= last; ++i) {
                count += _responsesTo(agentId, who[c], i, responders);
            }
        }
    }

    // ---- internals ----------------------------------------------------------------------------

    function _store(uint256 agentId, int128 value, uint8 valueDecimals, string calldata tag1, string calldata tag2)
        private
        returns (uint64 index)
    {
        index = ++_lastIndex[agentId][msg.sender];
        if (!_isClient[agentId][msg.sender]) {
            _isClient[agentId][msg.sender] = true;
            _clients[agentId].push(msg.sender);
        }
        _entries[agentId][msg.sender][index] = Entry(value, valueDecimals, false, tag1, tag2);
    }

    function _entry(uint256 agentId, address client, uint64 index) private view returns (Entry storage) {
        if (index == 0 || index > _lastIndex[agentId][client]) revert NoSuchFeedback(agentId, client, index);
        return _entries[agentId][client][index];
    }

    function _tagsMatch(Entry storage e, string calldata tag1, string calldata tag2, bytes32 t1, bytes32 t2)
        private
        view
        returns (bool)
    {
        if (bytes(tag1).length > 0 && keccak256(bytes(e.tag1)) != t1) return false;
        if (bytes(tag2).length > 0 && keccak256(bytes(e.tag2)) != t2) return false;
        return true;
    }

    function _countMatching(uint256 agentId, address[] memory who, string calldata tag1, string calldata tag2, bool includeRevoked)
        private
        view
        returns (uint256 n)
    {
        bytes32 t1 = keccak256(bytes(tag1));
        bytes32 t2 = keccak256(bytes(tag2));
        for (uint256 c = 0; c < who.length; ++c) {
            uint64 last = _lastIndex[agentId][who[c]];
            for (uint64 i = 1; i <= last; ++i) {
                Entry storage e = _entries[agentId][who[c]][i];
                if ((e.isRevoked && !includeRevoked) || !_tagsMatch(e, tag1, tag2, t1, t2)) continue;
                ++n;
            }
        }
    }

    function _responsesTo(uint256 agentId, address client, uint64 index, address[] calldata responders)
        private
        view
        returns (uint64 n)
    {
        mapping(address => uint64) storage counts = _responses[agentId][client][index];
        if (responders.length == 0) {
            address[] storage all = _responders[agentId][client][index];
            for (uint256 r = 0; r < all.length; ++r) n += counts[all[r]];
        } else {
            for (uint256 r = 0; r < responders.length; ++r) n += counts[responders[r]];
        }
    }
}
